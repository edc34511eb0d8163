"""Hit latency: resolves of a cached object through the real daemon.

Starts SeaweedFS and `assetd serve` as a subprocess, caches one object,
then measures, after a warm-up:

- one kept-open connection: p50/p99 of sequential resolves;
- a new connection per request: p50/p99 (connect, ask, answer, close);
- 1 and 16 concurrent clients (4 processes x 4 connections for 16):
  resolves per second over a fixed time window;
- the floor: the same hit through ``AssetService.try_hit`` in-process;
- the peer: a bare threaded Python echo server, same client, same run.

On these VMs a round trip between processes on different vCPUs costs about
60 us of wake-up alone, so the echo peer is the yardstick for the absolute
figures.

The daemon logs every resolve (to a file here), as in production.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.seaweedfs import READER_KEY, SeaweedFS, clean_env

BUCKET = "bench-assets"
KEY = "datasets/hit.csv"
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "info")  # "warning" isolates logging's cost
REQUEST = json.dumps({"op": "resolve", "source": f"s3://{BUCKET}/{KEY}"}).encode() + b"\n"


def _ask(sock: socket.socket) -> bytes:
    sock.sendall(REQUEST)
    data = sock.recv(65536)
    while not data.endswith(b"\n"):
        data += sock.recv(65536)
    return data


def _pct(samples: list[float], q: float) -> float:
    samples = sorted(samples)
    return samples[min(len(samples) - 1, int(q * len(samples)))]


def kept_open(path: str, n: int, expect: bytes | None = b'"cache":"hit"') -> dict[str, float]:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    for _ in range(200):
        _ask(sock)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        answer = _ask(sock)
        times.append(time.perf_counter() - t)
    assert expect is None or expect in answer, answer
    sock.close()
    return {"p50_us": _pct(times, 0.5) * 1e6, "p99_us": _pct(times, 0.99) * 1e6}


def new_connection(path: str, n: int) -> dict[str, float]:
    times = []
    for i in range(n + 100):
        t = time.perf_counter()
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        _ask(sock)
        sock.close()
        if i >= 100:
            times.append(time.perf_counter() - t)
    return {"p50_us": _pct(times, 0.5) * 1e6, "p99_us": _pct(times, 0.99) * 1e6}


def _worker(
    path: str, conns: int, seconds: float, start: float, out: multiprocessing.Queue
) -> None:  # type: ignore[type-arg]
    import threading

    counts = [0] * conns

    def run(i: int) -> None:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        while time.time() < start:
            time.sleep(0.001)
        end = start + seconds
        n = 0
        while time.time() < end:
            _ask(sock)
            n += 1
        counts[i] = n
        sock.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(counts))


def throughput(path: str, procs: int, conns: int, seconds: float) -> float:
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    start = time.time() + 0.5
    workers = [
        multiprocessing.Process(target=_worker, args=(path, conns, seconds, start, out))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    total = sum(out.get(timeout=seconds + 30) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def _echo_server(path: str) -> None:
    """The issue's yardstick: a bare threaded Python echo server on a Unix socket."""
    import socketserver

    class Echo(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while line := self.rfile.readline():
                self.wfile.write(line)

    socketserver.ThreadingUnixStreamServer(path, Echo).serve_forever()


def echo_peer(work: Path, n: int) -> dict[str, float]:
    path = tempfile.mktemp(prefix="echo-", suffix=".sock", dir=work)  # noqa: S306 - a socket name

    server = multiprocessing.Process(target=_echo_server, args=(path,), daemon=True)
    server.start()
    try:
        while not os.path.exists(path):
            time.sleep(0.01)
        return kept_open(path, n, expect=None)
    finally:
        server.kill()
        server.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def in_process_floor(weed: SeaweedFS, cache: Path, n: int) -> dict[str, float]:
    import boto3

    from assetd.config import S3Config, load_config
    from assetd.fetcher.s3 import S3Fetcher
    from assetd.service import AssetService
    from assetd.store import Store

    s3 = S3Config(endpoint_url=weed.endpoint_url, region="us-east-1", addressing_style="path")
    cfg = replace(load_config(env={"ASSETD_CACHE_DIR": str(cache)}), s3=s3)
    session = boto3.session.Session(
        aws_access_key_id=READER_KEY[0], aws_secret_access_key=READER_KEY[1]
    )
    store = Store(cache)
    service = AssetService(cfg, S3Fetcher(s3, session=session), store)
    source = f"s3://{BUCKET}/{KEY}"
    service.resolve(source)
    for _ in range(200):
        service.try_hit(source)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        res = service.try_hit(source)
        times.append(time.perf_counter() - t)
    assert res is not None and res.cache == "hit"
    service.close()
    store.close()
    return {"p50_us": _pct(times, 0.5) * 1e6, "p99_us": _pct(times, 0.99) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="assetd-hit-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        admin.put_object(Bucket=BUCKET, Key=KEY, Body=b"id,name\n" + b"1,x\n" * 10_000)
        sock_path = str(work / "run" / "assetd.sock")
        conf = work / "assetd.toml"
        conf.write_text(
            f'[daemon]\nsocket = "{sock_path}"\n[cache]\ndir = "{work / "cache"}"\n'
            f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
            f'[log]\nformat = "json"\nlevel = "{LOG_LEVEL}"\n'
        )
        env = clean_env(AWS_ACCESS_KEY_ID=READER_KEY[0], AWS_SECRET_ACCESS_KEY=READER_KEY[1])
        with (work / "daemon.log").open("wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "assetd", "serve", "--config", str(conf)],
                env=env,
                stderr=log,
            )
            try:
                deadline = time.monotonic() + 30
                while not os.path.exists(sock_path):
                    if time.monotonic() > deadline or daemon.poll() is not None:
                        raise RuntimeError("daemon did not start")
                    time.sleep(0.05)
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(sock_path)
                _ask(sock)  # the miss that fills the cache
                sock.close()
                runs = {
                    "echo": [echo_peer(work, args.requests) for _ in range(args.repeats)],
                    "kept_open": [kept_open(sock_path, args.requests) for _ in range(args.repeats)],
                    "new_connection": [
                        new_connection(sock_path, args.requests // 10) for _ in range(args.repeats)
                    ],
                    "clients_1_rps": [
                        throughput(sock_path, 1, 1, args.seconds) for _ in range(args.repeats)
                    ],
                    "clients_16_rps": [
                        throughput(sock_path, 4, 4, args.seconds) for _ in range(args.repeats)
                    ],
                }
            finally:
                daemon.terminate()
                daemon.wait(30)
        floor = in_process_floor(weed, work / "floor-cache", args.requests)

    def med(name: str, field: str | None = None) -> float:
        vals = [r[field] if field else r for r in runs[name]]  # type: ignore[index]
        return round(statistics.median(vals), 1)

    result = {
        "engine": "seaweedfs",
        "repeats": args.repeats,
        "echo_peer_p50_us": med("echo", "p50_us"),
        "echo_peer_p99_us": med("echo", "p99_us"),
        "kept_open_p50_us": med("kept_open", "p50_us"),
        "kept_open_p99_us": med("kept_open", "p99_us"),
        "new_connection_p50_us": med("new_connection", "p50_us"),
        "new_connection_p99_us": med("new_connection", "p99_us"),
        "clients_1_rps": med("clients_1_rps"),
        "clients_16_rps": med("clients_16_rps"),
        "in_process_p50_us": round(floor["p50_us"], 1),
        "in_process_p99_us": round(floor["p99_us"], 1),
    }
    result["kept_open_p50_vs_echo"] = round(
        result["kept_open_p50_us"] / result["echo_peer_p50_us"], 2
    )
    result["targets"] = {
        "kept_open_p50_le_50us": result["kept_open_p50_us"] <= 50,
        "kept_open_p99_le_200us": result["kept_open_p99_us"] <= 200,
        "new_connection_p50_le_200us": result["new_connection_p50_us"] <= 200,
        "clients_16_ge_20000_rps": result["clients_16_rps"] >= 20_000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
