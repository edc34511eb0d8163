"""A 200 MiB asset into a running container: assetd ``inject`` vs ``docker cp`` vs base64.

On a real dockerd (vfs, as in the tests) with the asset resolved by the real
daemon from SeaweedFS, after one warm-up round, the median of --runs rounds
(each round runs every method once, so load changes hit all alike) of:

- inject: ``assetd.grader_docker.inject`` in a fresh Python process (the
  grader), which resolves the asset through the daemon (a hit) and streams
  it into one exec; timed around ``inject`` alone. The process resets its
  peak RSS (``/proc/self/clear_refs``) just before, and reports the growth
  of ``VmHWM`` over its RSS at that point;
- inject into a tmpfs ``/tmp`` (where ``docker cp`` cannot reach);
- docker cp: the CLI copying the same blob to the same non-tmpfs path;
- floor: the same bytes through one exec's stdin into ``cat > /dev/null``
  (what the exec-stdin path costs with no tar, no file and no check);
- base64: the autograder's ``echo '<base64>' | base64 -d > target`` through
  ``exec_run``; it cannot carry 200 MiB at all, so the bench searches the
  size where it starts failing (bounded bisection) and reports the error.

Every placed copy is checked with ``sha256sum`` in the container (untimed).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.docker import IMAGE, Dockerd
from tests.support.seaweedfs import ADMIN_KEY, SeaweedFS, ensure_bucket

BUCKET = "bench-assets"
KEY = "inject/asset.bin"
MIB = 1 << 20

GRADER = r"""
import json, os, sys, time
import docker
from assetd import AssetdClient
from assetd.grader import AssetSourceResolver, parse_assets
from assetd.grader_docker import inject

sock, host, cid, source, target = sys.argv[1:6]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
container = docker.DockerClient(base_url=host, version="auto").containers.get(cid)
with AssetdClient(sock) as client:
    assets = AssetSourceResolver(client=client).resolve_assets(
        parse_assets({"assets": [{"source": source, "target": target}]}))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
before = status("VmRSS")
started = time.perf_counter()
result = inject(container, assets)
took = time.perf_counter() - started
print(json.dumps({"seconds": took, "rss_before": before, "hwm": status("VmHWM"),
                  "method": result.method, "calls": result.exec_calls}))
"""


def _interleaved(
    fns: dict[str, Callable[[], float]], runs: int, setup: Callable[[], object]
) -> dict[str, float]:
    """Median per method; each round runs every method once, so load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs + 1):  # the first round is the warm-up
        for name, fn in fns.items():
            setup()
            took = fn()
            if i:
                times[name].append(took)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _stdin_floor(container: Any, path: str, size: int) -> float:
    """The exec-stdin plumbing alone: the same bytes through one exec into `cat > /dev/null`."""
    api = container.client.api
    exec_id = api.exec_create(container.id, ["sh", "-c", "cat > /dev/null"], stdin=True)["Id"]
    raw = api.exec_start(exec_id, socket=True)
    sock = raw._sock
    sock.setblocking(True)
    started = time.perf_counter()
    with open(path, "rb") as src:
        while chunk := src.read(MIB):
            sock.sendall(chunk)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):
        pass
    while api.exec_inspect(exec_id)["Running"]:
        time.sleep(0.005)
    took = time.perf_counter() - started
    sock.close()
    raw.close()
    assert size == os.path.getsize(path)
    return took


def _sh(container: Any, script: str) -> str:
    result = container.exec_run(["sh", "-c", script], user="0")
    return str(result.output.decode(errors="replace"))


def _base64_limit(container: Any, hi: int = 1 * MIB) -> dict[str, Any]:
    """The autograder's base64 path: the largest size that works, the first that fails."""

    def attempt(size: int) -> str | None:
        data = os.urandom(size)
        cmd = f"echo '{base64.b64encode(data).decode()}' | base64 -d > /tmp/b64.bin"
        try:
            result = container.exec_run(["/bin/sh", "-c", cmd], user="root")
        except Exception as exc:  # the engine refuses the exec: this is the failure we look for
            return str(exc)[-300:]
        if result.exit_code != 0:
            return str(result.output.decode(errors="replace"))[-300:]
        got = _sh(container, "sha256sum /tmp/b64.bin").split()[0]
        return None if got == hashlib.sha256(data).hexdigest() else "bytes differ"

    lo, error = 1024, attempt(hi)
    assert attempt(lo) is None and error is not None, error
    for _ in range(24):  # bisect to 1 byte at most: bounded
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        failed = attempt(mid)
        if failed is None:
            lo = mid
        else:
            hi, error = mid, failed
    return {"largest_ok_bytes": lo, "first_failing_bytes": hi, "error": error}


def _measure(
    engine: Dockerd, daemon: DaemonProcess, source: str, sha: str, *, cache_path: str, args: Any
) -> dict[str, Any]:
    """Time each placement of the resolved blob into one running container."""
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        sys.exit("the docker CLI is needed for the docker cp peer")
    container = engine.client().containers.run(
        IMAGE,
        ["sleep", "3600"],
        detach=True,
        network_mode="none",
        tmpfs={"/tmp": f"rw,size={args.mib + 64}m,mode=1777"},
    )
    _sh(container, "mkdir -p /data")
    grader_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rss: list[int] = []

    def check(target: str) -> None:
        got = _sh(container, f"sha256sum {target}").split()[0]
        assert got == sha, (target, got)

    def run_inject(target: str) -> Callable[[], float]:
        def run() -> float:
            proc = subprocess.run(
                [sys.executable, "-c", GRADER, daemon.socket_path, engine.host,
                 container.id, source, target],
                capture_output=True, text=True, env=grader_env, check=False,
            )  # fmt: skip
            if proc.returncode:
                raise RuntimeError(proc.stderr[-2000:])
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            rss.append(out["hwm"] - out["rss_before"])
            check(target)
            return float(out["seconds"])

        return run

    def run_cp() -> float:
        started = time.perf_counter()
        subprocess.run(
            [docker_cli, "cp", cache_path, f"{container.id}:/data/cp.bin"],
            check=True,
            env={**os.environ, "DOCKER_HOST": engine.host},
            capture_output=True,
        )
        took = time.perf_counter() - started
        check("/data/cp.bin")
        return took

    def clean() -> None:
        _sh(container, "rm -f /data/cp.bin /data/inject.bin /tmp/inject.bin")

    try:
        medians = _interleaved(
            {
                "inject": run_inject("/data/inject.bin"),
                "inject_tmpfs": run_inject("/tmp/inject.bin"),
                "docker_cp": run_cp,
                "floor": lambda: _stdin_floor(container, cache_path, args.mib * MIB),
            },
            args.runs,
            clean,
        )
        b64 = _base64_limit(container)
    finally:
        container.remove(force=True)
    return {
        "inject_s": round(medians["inject"], 3),
        "inject_tmpfs_s": round(medians["inject_tmpfs"], 3),
        "docker_cp_s": round(medians["docker_cp"], 3),
        "exec_stdin_floor_s": round(medians["floor"], 3),
        "inject_vs_docker_cp": round(medians["inject"] / medians["docker_cp"], 2),
        "inject_vs_exec_stdin_floor": round(medians["inject"] / medians["floor"], 2),
        "grader_peak_rss_growth_mib": round(max(rss) / MIB, 2),
        "base64_exec_run": b64,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=200)
    args = parser.parse_args()
    with (
        Dockerd() as engine,
        SeaweedFS() as weed,
        tempfile.TemporaryDirectory(prefix="bi", dir="/tmp") as tmp,
    ):
        base = socket_dir(Path(tmp))
        blob = base / "src.bin"
        digest = hashlib.sha256()
        with blob.open("wb") as out:
            for _ in range(args.mib):
                block = os.urandom(MIB)
                digest.update(block)
                out.write(block)
        sha = digest.hexdigest()
        admin = weed.client()
        ensure_bucket(admin, BUCKET)
        admin.upload_file(str(blob), BUCKET, KEY)
        blob.unlink()
        config = write_config(
            base / "assetd.toml",
            {
                "daemon": {"socket": str(base / "a.sock")},
                "cache": {"dir": str(base / "cache")},
                "s3": {
                    "endpoint_url": weed.endpoint_url,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "max_object_bytes": "1GiB",
                },
            },
        )
        env = {"AWS_ACCESS_KEY_ID": ADMIN_KEY[0], "AWS_SECRET_ACCESS_KEY": ADMIN_KEY[1]}
        with DaemonProcess(config, str(base / "a.sock"), base / "assetd.log", env=env) as daemon:
            source = f"s3://{BUCKET}/{KEY}"
            answer = daemon.request({"op": "resolve", "source": source}, timeout=300)
            assert answer["ok"] and answer["sha256"] == sha, answer
            figures = _measure(engine, daemon, source, sha, cache_path=answer["path"], args=args)
    print(json.dumps({"bench": "inject", "asset_mib": args.mib, "runs": args.runs, **figures}))


if __name__ == "__main__":
    main()
