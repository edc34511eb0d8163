"""Abuse: clients that never read, hold connections, stop mid-line, or flood metrics.

Each test asserts its figure (and prints it); a well-behaved client's p99 is
compared with the unloaded p99 measured in the same run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from assetd import AssetdClient
from tests.hostile.conftest import (
    BUCKET,
    HOT_KEYS,
    Factory,
    hit_latencies,
    measured_p99,
    open_fds,
    proc_status,
    raise_fd_limit,
    rss_mib,
    scale,
)
from tests.support.daemon import DaemonProcess
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.integration
HOT = f"s3://{BUCKET}/{HOT_KEYS[0]}"
P99_FLOOR_S = 0.001  # below a millisecond, scheduler noise on a shared host dominates


def _pid(d: DaemonProcess) -> int:
    assert d.proc is not None
    return d.proc.pid


def _log_size(d: DaemonProcess) -> int:
    return d.log_path.stat().st_size


def _warm(d: DaemonProcess) -> None:
    """HOT cached, and the hit path run a while: the unloaded p99 is not a cold start."""
    assert "miss" == d.request({"op": "resolve", "source": HOT})["cache"]
    hit_latencies(d.socket_path, HOT, 500)


def _connect(path: str, timeout: float = 10) -> socket.socket:
    """Connect, waiting while the listen backlog is full (EAGAIN on a Unix socket)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _flood_without_reading(path: str, job: str, seconds: float, stop: threading.Event) -> int:
    """Pipeline hits and never read; returns how many request lines the kernel took."""
    line = json.dumps({"op": "resolve", "source": HOT, "job": job}).encode() + b"\n"
    chunk = line * 2000
    sent = 0
    sock = _connect(path)
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not stop.is_set():
            try:
                sent += sock.send(chunk)
            except TimeoutError:
                continue  # the daemon stopped reading us: keep pushing until the deadline
    finally:
        sock.close()
    return sent // len(line)


def _resolves_logged(d: DaemonProcess, job: str) -> int:
    return d.log().count(f'"job": "{job}"') + d.log().count(f'"job":"{job}"')


def test_non_reading_client_costs_bounded_memory_and_log(make_daemon: Factory) -> None:
    """A client that pipelines hits and never reads: bounded RSS, log and handled requests."""
    d = make_daemon()
    _warm(d)
    pid = _pid(d)
    rss_before, log_before = rss_mib(pid), _log_size(d)
    seconds = scale(5, 30)
    sent = _flood_without_reading(d.socket_path, "nonreader", seconds, threading.Event())
    time.sleep(0.5)  # the log is flushed every 0.2 s
    rss_after, log_growth = rss_mib(pid), _log_size(d) - log_before
    handled = _resolves_logged(d, "nonreader")
    print(
        f"\nnon-reading client, {seconds}s: sent {sent} lines, daemon handled {handled}, "
        f"RSS {rss_before:.0f} -> {rss_after:.0f} MiB, log +{log_growth / 1e6:.2f} MB"
    )
    assert handled < 20_000
    assert rss_after - rss_before < 30
    assert log_growth < 10e6
    assert d.request({"op": "ping"})["ok"]


def test_non_reading_client_gets_every_answer_once_it_reads(make_daemon: Factory) -> None:
    """Paused, not dropped: once the client reads, each line it sent gets one answer, in order."""
    d = make_daemon()
    _warm(d)
    n = 20_000
    payload = b"".join(
        json.dumps({"op": "resolve" if i % 3 else "ping", "source": HOT, "id": i}).encode() + b"\n"
        for i in range(n)
    )
    sock = _connect(d.socket_path, timeout=30)
    received = bytearray()

    def read() -> None:
        time.sleep(1.0)  # let the daemon run into its limits first
        received.extend(_read_all(sock))

    reader = threading.Thread(target=read)
    reader.start()
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    reader.join(60)
    sock.close()
    answers = [json.loads(line) for line in bytes(received).splitlines()]
    assert list(range(n)) == [a["id"] for a in answers]
    assert [True] * n == [a["ok"] for a in answers]


def test_non_reading_clients_leave_others_p99(make_daemon: Factory) -> None:
    """Non-reading clients flooding hits: a well-behaved client's p99 stays within 5x."""
    d = make_daemon()
    _warm(d)
    pid = _pid(d)
    n = scale(2000, 10_000)
    unloaded = measured_p99(d.socket_path, HOT, n)
    stop = threading.Event()
    clients = scale(20, 100)
    flooders = [
        threading.Thread(
            target=_flood_without_reading, args=(d.socket_path, f"nr{i}", 60, stop), daemon=True
        )
        for i in range(clients)
    ]
    rss_before = rss_mib(pid)
    for t in flooders:
        t.start()
    time.sleep(1.0)
    try:
        loaded = measured_p99(d.socket_path, HOT, n)
        rss_during = rss_mib(pid)
    finally:
        stop.set()
        for t in flooders:
            t.join(10)
    baseline = max(unloaded, P99_FLOOR_S)
    print(
        f"\n{clients} non-reading clients: p99 {unloaded * 1e3:.3f} ms unloaded, "
        f"{loaded * 1e3:.3f} ms loaded ({loaded / unloaded:.1f}x; "
        f"{loaded / baseline:.1f}x of max(unloaded, 1 ms)); "
        f"RSS {rss_before:.0f} -> {rss_during:.0f} MiB"
    )
    assert loaded <= 5 * baseline
    assert rss_during - rss_before < 100


def test_connection_cap_refuses_with_one_retryable_line(make_daemon: Factory) -> None:
    """Past max_connections: one `unavailable` line, then close; a freed slot is usable again."""
    d = make_daemon(daemon={"max_connections": 20})
    held = [_connect(d.socket_path) for _ in range(20)]
    try:
        for sock in held:
            sock.sendall(b'{"op":"ping"}\n')
            assert json.loads(sock.makefile("rb").readline())["ok"]
        log_before = d.log().count("at max_connections")
        refusals = []
        for _ in range(200):
            extra = _connect(d.socket_path)
            refusals.append(_read_all(extra))
            extra.close()
        held.pop().close()
        time.sleep(0.3)
        after_free = d.request({"op": "ping"})
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    answers = [[json.loads(line) for line in r.splitlines()] for r in refusals]
    assert [[("unavailable", True)]] * 200 == [
        [(a["error"]["code"], a["error"]["retryable"]) for a in lines] for lines in answers
    ]
    assert after_free["ok"]
    assert d.log().count("at max_connections") - log_before <= 2  # throttled, not 200 lines
    assert 200 == d.request({"op": "stats"})["errors"]["unavailable"]


def test_idle_connection_is_closed(make_daemon: Factory) -> None:
    """A connection with nothing asked for idle_timeout_s is closed; a busy one stays open."""
    d = make_daemon(daemon={"idle_timeout_s": 1})
    idle = _connect(d.socket_path, timeout=10)
    busy = _connect(d.socket_path, timeout=10)
    reader = busy.makefile("rb")
    started = time.monotonic()
    for _ in range(8):
        busy.sendall(b'{"op":"ping"}\n')
        assert json.loads(reader.readline())["ok"]
        time.sleep(0.5)
    assert b"" == _read_all(idle)
    took = time.monotonic() - started
    busy.sendall(b'{"op":"ping"}\n')
    assert json.loads(reader.readline())["ok"]
    idle.close()
    busy.close()
    assert took < 6


def test_half_line_gets_bad_request_after_line_timeout(make_daemon: Factory) -> None:
    """A line started and not finished within line_timeout_s: bad_request, then close."""
    d = make_daemon(daemon={"line_timeout_s": 1})
    sock = _connect(d.socket_path, timeout=15)
    sock.sendall(b'{"op":"ping","pad":"' + b"x" * 60_000)
    started = time.monotonic()
    answers = [json.loads(line) for line in _read_all(sock).splitlines()]
    took = time.monotonic() - started
    sock.close()
    assert [("bad_request", False)] == [
        (a["error"]["code"], a["error"]["retryable"]) for a in answers
    ]
    assert took < 5


def test_many_half_lines_bounded_then_released(make_daemon: Factory) -> None:
    """Connections each holding 65,000 bytes without a newline: RSS bounded, all closed in time."""
    raise_fd_limit()
    d = make_daemon(daemon={"line_timeout_s": 3, "max_connections": 1024})
    pid = _pid(d)
    rss_before = rss_mib(pid)
    n = scale(1500, 3000)
    socks = []
    try:
        for _ in range(n):
            sock = _connect(d.socket_path)
            with contextlib.suppress(OSError):  # refused ones are closed under us
                sock.sendall(b"x" * 65_000)
            socks.append(sock)
        time.sleep(0.5)
        rss_peak = rss_mib(pid)
        started = time.monotonic()
        codes = [[json.loads(line)["error"]["code"] for line in _read_all(s).splitlines()]
                 for s in socks]  # fmt: skip
        took = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    refused = codes.count(["unavailable"])
    timed_out = codes.count(["bad_request"])
    print(
        f"\n{n} half-line connections: {n - refused} held, RSS {rss_before:.0f} -> "
        f"{rss_peak:.0f} MiB; all closed {took:.1f}s after the last was opened"
    )
    assert (n, 1024) == (refused + timed_out, timed_out)
    assert rss_peak - rss_before < 1024 * 65_000 / 2**20 + 40  # a line per held connection
    assert took < 10
    assert 1 == d.request({"op": "stats"})["connections"]  # only this request's own


def test_idle_connections_cost_little_and_leave_p99(make_daemon: Factory) -> None:
    """2,000 idle connections: held within max_connections, small RSS, others' p99 within 5x."""
    raise_fd_limit()
    d = make_daemon(daemon={"max_connections": 2100})
    _warm(d)
    pid = _pid(d)
    n = scale(2000, 10_000)
    unloaded = measured_p99(d.socket_path, HOT, n)
    rss_before, fds_before = rss_mib(pid), open_fds(pid)
    idle = [_connect(d.socket_path) for _ in range(2000)]
    try:
        time.sleep(0.5)
        held = d.request({"op": "stats"})["connections"]
        rss_held, fds_held = rss_mib(pid), open_fds(pid)
        loaded = measured_p99(d.socket_path, HOT, n)
    finally:
        for sock in idle:
            sock.close()
    baseline = max(unloaded, P99_FLOOR_S)
    print(
        f"\n2000 idle connections: RSS {rss_before:.0f} -> {rss_held:.0f} MiB, "
        f"fds {fds_before} -> {fds_held}; p99 {unloaded * 1e3:.3f} -> {loaded * 1e3:.3f} ms "
        f"({loaded / unloaded:.1f}x)"
    )
    assert held >= 2000
    assert rss_held - rss_before < 40
    assert loaded <= 5 * baseline


def test_metrics_flood_starts_no_threads(make_daemon: Factory, short_tmp: Path) -> None:
    """520 metrics connections sending a bare request line: no new threads, misses still work."""
    raise_fd_limit()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = make_daemon(metrics={"listen": f"127.0.0.1:{port}"})
    pid = _pid(d)
    threads_before = proc_status(pid, "Threads")
    flood = []
    try:
        for _ in range(520):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            flood.append(sock)
        time.sleep(0.5)
        threads_during = proc_status(pid, "Threads")
        miss = d.request({"op": "resolve", "source": f"s3://{BUCKET}/{HOT_KEYS[1]}"})
        stats = d.request({"op": "stats"})
    finally:
        for sock in flood:
            sock.close()
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as scrape:
        scrape.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = _read_all(scrape)
    print(f"\nmetrics flood: daemon threads {threads_before} -> {threads_during}")
    assert threads_during <= threads_before + 2
    assert (True, True) == (miss["ok"], stats["ok"])
    assert body.startswith(b"HTTP/1.1 200 ")
    assert b"assetd_cache_entries" in body


def test_prefetch_resolves_four_entries_at_a_time(make_daemon: Factory, seaweedfs: Any) -> None:
    """12 cold entries whose first GET stalls 0.5 s take 3 rounds: 4 requests to S3 at once."""
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    try:
        proxy.add(method="GET", stall=0.5)
        d = make_daemon(endpoint=proxy.url)
        sources = [f"s3://{BUCKET}/hostile/absent-{i}.csv" for i in range(12)]
        started = time.monotonic()
        answer = d.request({"op": "prefetch", "sources": sources}, timeout=60)
        took = time.monotonic() - started
        gets = proxy.counts["GET"]
    finally:
        proxy.stop()
    print(f"\nprefetch of 12 stalled GETs: {took:.2f}s")
    assert ["not_found"] * 12 == [r["error"]["code"] for r in answer["results"]]
    assert 12 == gets
    assert took >= 1.45  # 12 / 4 rounds of 0.5 s; unbounded it is one round


def test_client_reconnects_after_idle_close(make_daemon: Factory) -> None:
    """AssetdClient keeps working across the daemon closing its idle connection."""
    d = make_daemon(daemon={"idle_timeout_s": 1})
    with AssetdClient(d.socket_path, timeout=10) as client:
        first = client.ping()
        time.sleep(2.5)  # the daemon closes the kept connection meanwhile
        second = client.ping()
    assert ("0.1.0", "0.1.0") == (first, second)


def test_client_that_stops_reading_is_closed_after_idle_timeout(make_daemon: Factory) -> None:
    """A connection whose unread answers stay above the bound for idle_timeout_s is closed."""
    d = make_daemon(daemon={"idle_timeout_s": 1})
    _warm(d)
    line = json.dumps({"op": "resolve", "source": HOT}).encode() + b"\n"
    sock = _connect(d.socket_path)
    sock.settimeout(0.2)
    started = time.monotonic()
    closed_after = None
    while time.monotonic() - started < 15:
        try:
            sock.send(line * 500)
        except TimeoutError:
            continue  # paused: keep pushing, never read
        except OSError:  # EPIPE / ECONNRESET: the daemon closed us
            closed_after = time.monotonic() - started
            break
    sock.close()
    print(f"\nnon-reading client closed after {closed_after}s")
    assert closed_after is not None
    assert closed_after < 6
    assert d.request({"op": "ping"})["ok"]


def test_idle_counts_from_the_last_answer(make_daemon: Factory, seaweedfs: Any) -> None:
    """A request answered after idle_timeout_s leaves its connection open for the next one."""
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    try:
        proxy.add(method="HEAD", stall=4.0)  # the answer comes after the 2 s idle timeout
        d = make_daemon(endpoint=proxy.url, daemon={"idle_timeout_s": 2})
        sock = _connect(d.socket_path, timeout=20)
        reader = sock.makefile("rb")
        sock.sendall(json.dumps({"op": "resolve", "source": HOT}).encode() + b"\n")
        first = json.loads(reader.readline())
        time.sleep(1.2)  # a sweep (every 1 s) ran: idle since the request, not since the answer
        sock.sendall(b'{"op":"ping"}\n')
        second = reader.readline()
        sock.close()
    finally:
        proxy.stop()
    assert (True, "miss") == (first["ok"], first["cache"])
    assert True is json.loads(second)["ok"]
