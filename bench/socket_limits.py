"""Socket limits: what max_pipelined and max_unsent_bytes cost and buy.

Starts SeaweedFS, then for each setting a fresh `assetd serve`, and measures
after a warm-up:

- throughput of 100 clients pipelining 1,000 mixed requests each (the
  hostile load test's mix: hits, pings, stats, refusals, not_found, bad
  frames), as a ratio against the default setting: every setting runs
  once per round, five rounds, medians;
- what one client that pipelines hits for 5 s and never reads costs: lines
  the daemon handled, and its RSS growth;
- the RSS of 1,000 idle connections and of 1,000 connections each holding
  a 65,000-byte unfinished line (the bound max_connections puts on memory).

Prints one JSON line. The machine is shared: compare ratios, not absolutes.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.hostile.conftest import BUCKET, HOT_KEYS, raise_fd_limit, rss_mib
from tests.hostile.test_abuse import _flood_without_reading
from tests.hostile.test_load import plan, run_client
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.seaweedfs import SCOPED_KEY, SeaweedFS, ensure_bucket

SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "pipelined_8": {"max_pipelined": 8},
    "pipelined_64": {"max_pipelined": 64},
    "unsent_256KiB": {"max_unsent_bytes": "256KiB"},
    "unsent_1MiB": {"max_unsent_bytes": "1MiB"},
}


def start(weed: SeaweedFS, base: Path, name: str, daemon: dict[str, Any]) -> DaemonProcess:
    sock = str(base / f"{name}.sock")
    config = write_config(
        base / f"{name}.toml",
        {
            "daemon": {"socket": sock, **daemon},
            "cache": {"dir": str(base / f"{name}-cache")},
            "s3": {
                "endpoint_url": weed.endpoint_url,
                "region": "us-east-1",
                "addressing_style": "path",
                "allowed_buckets": [BUCKET],
            },
            "log": {"format": "json"},
        },
    )
    env = {"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]}
    d = DaemonProcess(config, sock, base / f"{name}.log", env=env).start()
    for key in HOT_KEYS:
        assert d.request({"op": "resolve", "source": f"s3://{BUCKET}/{key}"})["ok"]
    return d


def load(d: DaemonProcess, clients: int = 100, per_client: int = 1000) -> float:
    """Requests per second for the mixed pipelined load."""
    reports: list[dict[str, Any]] = [{} for _ in range(clients)]
    threads = [
        threading.Thread(target=run_client, args=(d.socket_path, plan(i, per_client), reports[i]))
        for i in range(clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.perf_counter() - started
    assert not [p for r in reports for p in r["problems"]]
    return clients * per_client / took


def non_reader(d: DaemonProcess) -> dict[str, float]:
    assert d.proc is not None
    before = rss_mib(d.proc.pid)
    _flood_without_reading(d.socket_path, "bench-nonreader", 5, threading.Event())
    time.sleep(0.5)
    handled = d.log().count('"job": "bench-nonreader"') + d.log().count('"job":"bench-nonreader"')
    return {"handled": handled, "rss_growth_mib": round(rss_mib(d.proc.pid) - before, 1)}


def held_connections(d: DaemonProcess, payload: bytes, n: int = 1000) -> float:
    """RSS growth (MiB) while n connections each sent ``payload`` and wait."""
    assert d.proc is not None
    before = rss_mib(d.proc.pid)
    socks = []
    for _ in range(n):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(d.socket_path)
        if payload:
            sock.sendall(payload)
        socks.append(sock)
    time.sleep(1.0)
    growth = rss_mib(d.proc.pid) - before
    for sock in socks:
        sock.close()
    return round(growth, 1)


def main() -> None:
    raise_fd_limit()
    with SeaweedFS() as weed, tempfile.TemporaryDirectory(prefix="bs", dir="/tmp") as tmp:
        base = socket_dir(Path(tmp))
        client = weed.client()
        ensure_bucket(client, BUCKET)
        for i, key in enumerate(HOT_KEYS):
            client.put_object(Bucket=BUCKET, Key=key, Body=b"id,v\n" + b"%d,x\n" % i * 50)
        daemons = {
            name: start(weed, base, name, {"max_connections": 1100, **daemon})
            for name, daemon in SETTINGS.items()
        }
        try:
            rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for d in daemons.values():
                load(d, clients=20, per_client=200)  # warm-up
            for _ in range(5):  # rounds over every setting: drift hits them all alike
                for name, d in daemons.items():
                    rates[name].append(load(d))
            figures: dict[str, Any] = {}
            for name, d in daemons.items():
                figures[name] = {"req_per_s": round(sorted(rates[name])[2]), **non_reader(d)}
            d = daemons["default"]
            figures["default"]["idle_1000_rss_mib"] = held_connections(d, b"")
            figures["default"]["half_line_1000_rss_mib"] = held_connections(d, b"x" * 65_000)
        finally:
            for d in daemons.values():
                d.stop()
        base_rate = figures["default"]["req_per_s"]
        for values in figures.values():
            values["vs_default"] = round(values["req_per_s"] / base_rate, 2)
        print(json.dumps({"bench": "socket_limits", **figures}))


if __name__ == "__main__":
    main()
