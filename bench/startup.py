"""Start-up: time from exec to READY=1 with a 100,000-entry cache.

Builds a cache of N entries (tiny blobs, real index rows), then starts
`assetd serve` repeatedly with a NOTIFY_SOCKET and times exec -> READY=1,
the median over --runs after a warm-up. The same is measured on an empty
cache in the same run (the peer), and so is the background recovery that
runs after READY (from the daemon's "cache recovered" log line).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from assetd.store import Store
from tests.support.seaweedfs import clean_env


def build_cache(root: Path, entries: int) -> float:
    """N entries as a running daemon would leave them; returns seconds taken."""
    started = time.monotonic()
    store = Store(root)
    now = time.time()
    batch = 5_000
    for first in range(0, entries, batch):
        with store.index.transact():
            for i in range(first, min(entries, first + batch)):
                data = b"row %d\n" % i
                sha = hashlib.sha256(data).hexdigest()
                path = store.blob_path(sha)
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
                path.chmod(0o444)
                st = path.stat()
                etag = f'"{hashlib.md5(data).hexdigest()}"'  # noqa: S324 - S3's ETag
                store.index.set(
                    ("blob", sha), [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
                )
                store.index.set(
                    ("obj", "bench", f"k/{i}", f"e:{etag}"),
                    {
                        "sha256": sha,
                        "size": len(data),
                        "etag": etag,
                        "version_id": None,
                        "fetched_at": now,
                        "last_access": now,
                        "pinned_until": 0.0,
                    },
                )
                store.index.set(("cur", "bench", f"k/{i}"), {"tag": f"e:{etag}", "checked_at": now})
    store.close()
    return time.monotonic() - started


def time_to_ready(work: Path, cache: Path) -> tuple[float, float | None]:
    """(seconds exec -> READY=1, seconds until recovery was logged)."""
    notify_path = str(work / "n.sock")
    sock_path = work / "a.sock"
    config = work / "assetd.toml"
    config.write_text(
        f'[daemon]\nsocket = "{sock_path}"\n[cache]\ndir = "{cache}"\n'
        '[s3]\nendpoint_url = "http://127.0.0.1:9"\nregion = "us-east-1"\n[log]\nformat = "json"\n'
    )
    log_path = work / "daemon.log"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        if os.path.exists(notify_path):
            os.unlink(notify_path)
        notify.bind(notify_path)
        notify.settimeout(60)
        with log_path.open("wb") as log:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "assetd", "serve", "--config", str(config)],
                env=clean_env(
                    NOTIFY_SOCKET=notify_path, AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y"
                ),
                stderr=log,
            )
            while b"READY=1" not in notify.recv(4096):
                pass
            ready = time.monotonic() - started
            recovered = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                text = log_path.read_text()
                if '"cache recovered"' in text:
                    line = next(x for x in text.splitlines() if '"cache recovered"' in x)
                    recovered = float(json.loads(line)["seconds"])
                    break
                time.sleep(0.05)
            proc.terminate()
            proc.wait(30)
    return ready, recovered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="assetd-start-") as tmp:
        work = Path(tmp)
        build_s = build_cache(work / "full", args.entries)
        (work / "empty").mkdir()
        empty = [time_to_ready(work, work / "empty") for _ in range(args.runs + 1)][1:]
        full = [time_to_ready(work, work / "full") for _ in range(args.runs + 1)][1:]
    ready = statistics.median(r for r, _ in full)
    result = {
        "entries": args.entries,
        "runs": args.runs,
        "build_cache_s": round(build_s, 1),
        "ready_s": round(ready, 3),
        "ready_empty_cache_s": round(statistics.median(r for r, _ in empty), 3),
        "background_recovery_s": statistics.median(x or 0.0 for _, x in full),
        "targets": {"ready_le_2s": ready <= 2.0},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
