"""Fixtures for the hostile suite: the real daemon on SeaweedFS, figures read from /proc.

ASSETD_HOSTILE_PROFILE picks the size of every loop: ``short`` (the default,
what ``make test`` and CI run) or ``full`` (``make hostile``). Each test
asserts its figure in both; ``full`` only runs longer and wider.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.seaweedfs import SCOPED_BUCKET, SCOPED_KEY, SeaweedFS, ensure_bucket

BUCKET = SCOPED_BUCKET
PROFILE = os.environ.get("ASSETD_HOSTILE_PROFILE", "short")
if PROFILE not in ("short", "full"):
    raise RuntimeError(f"ASSETD_HOSTILE_PROFILE must be short or full, got {PROFILE!r}")
HOT_KEYS = [f"hostile/hot-{i}.csv" for i in range(8)]


def scale(short: int, full: int) -> int:
    """A count for the current profile."""
    return full if PROFILE == "full" else short


def raise_fd_limit(want: int = 8192) -> None:
    """Room for thousands of client sockets in this test process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (VmRSS in KiB, Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mib(pid: int) -> float:
    return proc_status(pid, "VmRSS") / 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@pytest.fixture(scope="module")
def s3(seaweedfs: SeaweedFS) -> Any:
    """The scoped bucket with a few small objects the suite resolves."""
    client = seaweedfs.client()
    ensure_bucket(client, BUCKET)
    for i, key in enumerate(HOT_KEYS):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"id,v\n" + b"%d,x\n" % i * 50)
    return client


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short world-traversable dir: sun_path is 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="ah", dir="/tmp") as tmp:
        yield socket_dir(Path(tmp))


Factory = Callable[..., DaemonProcess]


@pytest.fixture
def make_daemon(seaweedfs: SeaweedFS, s3: Any, short_tmp: Path) -> Iterator[Factory]:
    """Start `assetd serve` with the suite's config plus per-test sections."""
    started: list[DaemonProcess] = []

    def make(
        *,
        endpoint: str | None = None,
        daemon: dict[str, Any] | None = None,
        s3_cfg: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        name: str = "d",
        start: bool = True,
    ) -> DaemonProcess:
        sock = str(short_tmp / f"{name}.sock")
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"socket": sock, **(daemon or {})},
            "cache": {"dir": str(short_tmp / f"{name}-cache"), **(cache or {})},
            "s3": {
                "endpoint_url": endpoint or seaweedfs.endpoint_url,
                "region": "us-east-1",
                "addressing_style": "path",
                "allowed_buckets": [BUCKET],
                "max_object_bytes": "8MiB",
                "max_attempts": 2,
                **(s3_cfg or {}),
            },
            "log": {"format": "json"},
        }
        if metrics:
            sections["metrics"] = metrics
        proc = DaemonProcess(
            write_config(short_tmp / f"{name}.toml", sections),
            sock,
            short_tmp / f"{name}.log",
            env={"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]},
            grace=2.0,
        )
        started.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in started:
        proc.stop()


def hit_latencies(socket_path: str, source: str, n: int, timeout: float = 30) -> list[float]:
    """Seconds per resolve for ``n`` sequential requests on one kept connection."""
    line = json.dumps({"op": "resolve", "source": source}).encode() + b"\n"
    out = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        reader = sock.makefile("rb")
        for _ in range(n):
            started = time.perf_counter()
            sock.sendall(line)
            answer = json.loads(reader.readline())
            out.append(time.perf_counter() - started)
            assert answer["ok"], answer
    return out
