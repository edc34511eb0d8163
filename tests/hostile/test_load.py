"""Load: many clients pipelining mixed requests at the real daemon.

0 unexpected errors and 0 lost or mismatched ids; throughput and p99 are
printed (never asserted as speed), RSS and open fds before and after are
asserted within sane bounds.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import pytest

from tests.hostile.conftest import (
    BUCKET,
    HOT_KEYS,
    Factory,
    open_fds,
    p99,
    raise_fd_limit,
    rss_mib,
    scale,
)

pytestmark = pytest.mark.integration
CLIENTS = 100
PER_CLIENT = scale(1000, 1000)
ABSENT = f"s3://{BUCKET}/hostile/absent-load.csv"
REFUSED = "s3://other-bucket/hostile/x.csv"


def plan(client: int, n: int) -> list[tuple[bytes, Any, str | None]]:
    """(line, expected id, expected error code or None) for each request of one client."""
    out: list[tuple[bytes, Any, str | None]] = []
    for j in range(n):
        rid = client * 100_000 + j
        kind = j % 20
        if kind < 14:
            req: dict[str, Any] = {"op": "resolve", "source": f"s3://{BUCKET}/{HOT_KEYS[j % 8]}"}
            code = None
        elif kind < 16:
            req, code = {"op": "ping"}, None
        elif kind == 16:
            req, code = {"op": "stats"}, None
        elif kind == 17:
            req, code = {"op": "resolve", "source": REFUSED}, "not_allowed"
        elif kind == 18:
            req, code = {"op": "resolve", "source": ABSENT}, "not_found"
        else:
            out.append((b"not json", None, "bad_request"))
            continue
        out.append((json.dumps({"id": rid, **req}).encode(), rid, code))
    return out


def run_client(
    path: str, requests: list[tuple[bytes, Any, str | None]], report: dict[str, Any]
) -> None:
    """Pipeline every line (a writer thread), read every answer; record problems and latencies."""
    sent_at = [0.0] * len(requests)
    latencies: list[float] = []
    problems: list[str] = []
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(120)
        sock.connect(path)

        def write() -> None:
            for start in range(0, len(requests), 50):
                chunk = requests[start : start + 50]
                now = time.perf_counter()
                for k in range(start, start + len(chunk)):
                    sent_at[k] = now
                sock.sendall(b"".join(line + b"\n" for line, _, _ in chunk))

        writer = threading.Thread(target=write)
        writer.start()
        reader = sock.makefile("rb")
        for k, (_, rid, code) in enumerate(requests):
            raw = reader.readline()
            if not raw:
                problems.append(f"lost answers from #{k}")
                break
            latencies.append(time.perf_counter() - sent_at[k])
            answer = json.loads(raw)
            got = None if answer["ok"] else answer["error"]["code"]
            if (answer.get("id"), got) != (rid, code):
                problems.append(f"#{k}: expected {(rid, code)}, got {(answer.get('id'), got)}")
        writer.join(60)
    report["latencies"] = latencies
    report["problems"] = problems


def test_100_clients_pipelining_mixed_requests(make_daemon: Factory) -> None:
    """100 clients x 1,000 mixed pipelined requests: 0 unexpected answers, 0 lost or mismatched."""
    raise_fd_limit()
    d = make_daemon()
    for key in HOT_KEYS:
        assert d.request({"op": "resolve", "source": f"s3://{BUCKET}/{key}"})["ok"]
    assert "not_found" == d.request({"op": "resolve", "source": ABSENT})["error"]["code"]
    assert d.proc is not None
    pid = d.proc.pid
    rss_before, fds_before = rss_mib(pid), open_fds(pid)
    reports: list[dict[str, Any]] = [{} for _ in range(CLIENTS)]
    threads = [
        threading.Thread(target=run_client, args=(d.socket_path, plan(i, PER_CLIENT), reports[i]))
        for i in range(CLIENTS)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.perf_counter() - started
    time.sleep(0.5)
    rss_after, fds_after = rss_mib(pid), open_fds(pid)
    latencies = [x for r in reports for x in r.get("latencies", [])]
    problems = [p for r in reports for p in r.get("problems", ["client did not finish"])]
    total = CLIENTS * PER_CLIENT
    print(
        f"\nload: {CLIENTS} clients x {PER_CLIENT} requests in {took:.1f}s = "
        f"{total / took:,.0f} req/s (client and daemon on the same 2 cores); "
        f"p99 {p99(latencies) * 1e3:.1f} ms pipelined; "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB; open fds {fds_before} -> {fds_after}"
    )
    assert [] == problems[:5]
    assert total == len(latencies)
    assert p99(latencies) < 30.0  # sane, not a speed target: nothing waited for a timeout
    assert fds_after <= fds_before + 2
    assert rss_after - rss_before < 60
    assert {"internal": 0} == {"internal": d.request({"op": "stats"})["errors"].get("internal", 0)}
