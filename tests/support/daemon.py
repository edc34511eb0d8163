"""Run the real daemon (`python -m assetd serve`) as a subprocess for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.seaweedfs import clean_env


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """A TOML config from nested dicts (strings, numbers, bools, lists of those)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonFactory:
    """Starts ``assetd serve`` processes in ``tmp``, each with its own config; ``stop()`` ends all.

    Every daemon gets the key pair ``key``, loopback S3 at ``endpoint`` with
    path addressing and 2 attempts, JSON logs, and the ``s3`` defaults given
    here; each call may add or override sections.
    """

    def __init__(
        self, tmp: Path, endpoint: str, key: tuple[str, str], s3: Mapping[str, Any] | None = None
    ) -> None:
        self.tmp, self.endpoint, self.key = tmp, endpoint, key
        self.s3 = dict(s3 or {})
        self.started: list[DaemonProcess] = []

    def __call__(
        self,
        *,
        endpoint: str | None = None,
        daemon: dict[str, Any] | None = None,
        s3_cfg: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        name: str = "d",
        start: bool = True,
    ) -> DaemonProcess:
        sock = str(self.tmp / f"{name}.sock")
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"socket": sock, **(daemon or {})},
            "cache": {"dir": str(self.tmp / f"{name}-cache"), **(cache or {})},
            "s3": {
                "endpoint_url": endpoint or self.endpoint,
                "region": "us-east-1",
                "addressing_style": "path",
                "max_attempts": 2,
                **self.s3,
                **(s3_cfg or {}),
            },
            "log": {"format": "json"},
        }
        if metrics:
            sections["metrics"] = metrics
        proc = DaemonProcess(
            write_config(self.tmp / f"{name}.toml", sections),
            sock,
            self.tmp / f"{name}.log",
            env={
                "AWS_ACCESS_KEY_ID": self.key[0],
                "AWS_SECRET_ACCESS_KEY": self.key[1],
                **(env or {}),
            },
            grace=2.0,
        )
        self.started.append(proc)
        return proc.start() if start else proc

    def stop(self) -> None:
        for proc in self.started:
            proc.stop()


@dataclass
class DaemonProcess:
    """One `assetd serve`; stderr (its JSON log) goes to ``log_path``."""

    config: Path
    socket_path: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    grace: float = 5.0
    proc: subprocess.Popen[bytes] | None = None
    argv_prefix: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        argv = [
            *self.argv_prefix,
            sys.executable,
            "-m",
            "assetd",
            "serve",
            "--config",
            str(self.config),
            "--grace",
            str(self.grace),
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=clean_env(**self.env),
                stderr=log,
                stdout=log,
                pass_fds=self.pass_fds,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            with contextlib.suppress(OSError):
                if self.request({"op": "ping"}).get("ok"):
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"daemon not ready after {timeout}s: {self.log()}")

    def request(self, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """One request on a fresh connection."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            answer: dict[str, Any] = json.loads(sock.makefile("rb").readline())
            return answer

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def socket_dir(base: Path) -> Path:
    """A short, world-traversable directory for sockets (tmp_path is 0700 and long)."""
    path = Path(os.path.realpath(base))
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


# The venv's interpreter lives under /root (mode 0700): another uid runs the system one.
OTHER_UID_PYTHON = "/usr/bin/python3"


def ping_as_nobody(socket_path: str, groups: tuple[int, ...] = ()) -> dict[str, Any]:
    """One ping from uid/gid 65534 (nobody), with ``groups`` as supplementary groups."""
    client = (
        "import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        's.sendall(b\'{"op":"ping","id":9}\\n\'); print(s.makefile().readline())'
    )
    proc = subprocess.run(
        [OTHER_UID_PYTHON, "-c", client, socket_path],
        user=65534,
        group=65534,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
        check=False,
    )
    assert 0 == proc.returncode, proc.stderr
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer
