"""Unit tests for assetd.metrics: histograms, the stats summary and the Prometheus export."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from assetd.errors import ConfigError
from assetd.metrics import BUCKETS, Histogram, Metrics, PrometheusExport


def fake_stats() -> dict[str, Any]:
    """A stats() answer shaped like Daemon.stats (DESIGN.md's stats op)."""
    return {
        "entries": 3,
        "bytes": 4096,
        "hits": 5,
        "misses": 2,
        "coalesced": 1,
        "stale": 0,
        "errors": {"not_found": 2, "timeout": 1},
        "bytes_fetched": 8192,
        "s3_requests": {"head": 4, "get": 2},
        "in_flight": 0,
        "connections": 1,
    }


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- Histogram ---------------------------------------------------------------------------


def test_histogram_empty_quantile_is_none() -> None:
    """An empty histogram has no quantiles."""
    hist = Histogram()
    assert None is hist.quantile(0.5)
    assert None is hist.quantile(0.99)
    assert 0 == hist.n


def test_histogram_observe_counts_in_bucket() -> None:
    """A value lands in the first bucket whose upper bound is >= the value."""
    hist = Histogram()
    hist.observe(0.003)
    assert 1 == hist.counts[BUCKETS.index(0.005)]
    assert 1 == sum(hist.counts)
    assert 1 == hist.n
    assert 0.003 == hist.total


def test_histogram_value_on_a_bound_is_in_that_bucket() -> None:
    """A value equal to a bucket bound counts in that bucket (Prometheus "le")."""
    hist = Histogram()
    hist.observe(0.005)
    assert 1 == hist.counts[BUCKETS.index(0.005)]
    assert 0.005 == hist.quantile(0.5)


def test_histogram_overflow_goes_to_inf() -> None:
    """A value above the last bound lands in the +Inf slot; its quantile is None (no JSON inf)."""
    hist = Histogram()
    hist.observe(120.0)
    assert 1 == hist.counts[-1]
    assert len(BUCKETS) + 1 == len(hist.counts)
    assert None is hist.quantile(0.5)


def test_histogram_quantile_is_bucket_upper_bound() -> None:
    """Quantiles report the upper bound of the bucket holding them."""
    hist = Histogram()
    for _ in range(98):
        hist.observe(0.00003)  # first bucket: <= 50 us
    hist.observe(0.2)  # <= 0.25
    hist.observe(0.2)
    assert 0.00005 == hist.quantile(0.5)
    assert 0.00005 == hist.quantile(0.98)
    assert 0.25 == hist.quantile(0.99)
    assert 0.25 == hist.quantile(1.0)
    assert 100 == hist.n
    assert pytest.approx(98 * 0.00003 + 0.4) == hist.total


def test_buckets_are_sorted() -> None:
    """Bucket bounds strictly increase (bisect relies on it)."""
    assert sorted(set(BUCKETS)) == list(BUCKETS)


# -- Metrics.summary ----------------------------------------------------------------------


def test_metrics_summary_empty() -> None:
    """No observations, no summary entries."""
    assert {} == Metrics().summary()


def test_metrics_summary_shape() -> None:
    """summary groups by op then outcome with count and p50/p99 bucket bounds in ms."""
    metrics = Metrics()
    metrics.observe("resolve", "hit", 0.00004)
    metrics.observe("resolve", "hit", 0.00004)
    metrics.observe("resolve", "miss", 0.3)
    metrics.observe("stats", "ok", 0.002)
    summary = metrics.summary()
    assert {"resolve", "stats"} == set(summary)
    assert {"hit", "miss"} == set(summary["resolve"])
    hit = summary["resolve"]["hit"]
    assert {"count", "p50_le_ms", "p99_le_ms"} == set(hit)
    assert 2 == hit["count"]
    assert pytest.approx(0.05) == hit["p50_le_ms"]
    assert pytest.approx(0.05) == hit["p99_le_ms"]
    assert 1 == summary["resolve"]["miss"]["count"]
    assert pytest.approx(500.0) == summary["resolve"]["miss"]["p99_le_ms"]
    assert pytest.approx(2.5) == summary["stats"]["ok"]["p50_le_ms"]


def test_metrics_summary_is_strict_json_after_a_slow_request() -> None:
    """A request slower than the last bucket still gives a summary that is valid JSON."""
    metrics = Metrics()
    metrics.observe("resolve", "miss", 90.0)  # possible: s3.deadline_s defaults to 120
    json.dumps(metrics.summary(), allow_nan=False)


# -- PrometheusExport ----------------------------------------------------------------------


def _export(metrics: Metrics | None = None, **kwargs: Any) -> PrometheusExport:
    options: dict[str, Any] = {"listen": None, "textfile": None} | kwargs
    return PrometheusExport(fake_stats, metrics or Metrics(), **options)


def test_prometheus_text_contains_every_family() -> None:
    """The exposition holds gauges, counters by label and the latency histogram."""
    metrics = Metrics()
    metrics.observe("resolve", "hit", 0.003)
    text = generate_latest(_export(metrics).registry).decode()
    assert "assetd_cache_entries 3.0" in text
    assert 'assetd_resolves_total{cache="hit"} 5.0' in text
    assert 'assetd_errors_total{code="not_found"} 2.0' in text
    assert "assetd_request_seconds_bucket{" in text
    samples = _samples(text)
    assert 3.0 == samples[("assetd_cache_entries", ())]
    assert 4096.0 == samples[("assetd_cache_bytes", ())]
    assert 5.0 == samples[("assetd_resolves_total", (("cache", "hit"),))]
    assert 2.0 == samples[("assetd_resolves_total", (("cache", "miss"),))]
    assert 1.0 == samples[("assetd_resolves_total", (("cache", "coalesced"),))]
    assert 0.0 == samples[("assetd_resolves_total", (("cache", "stale"),))]
    assert 2.0 == samples[("assetd_errors_total", (("code", "not_found"),))]
    assert 1.0 == samples[("assetd_errors_total", (("code", "timeout"),))]
    assert 8192.0 == samples[("assetd_fetched_bytes_total", ())]
    assert 4.0 == samples[("assetd_s3_requests_total", (("op", "head"),))]
    assert 2.0 == samples[("assetd_s3_requests_total", (("op", "get"),))]


def test_prometheus_histogram_is_cumulative() -> None:
    """Histogram buckets are cumulative, end in +Inf, with _count and _sum."""
    metrics = Metrics()
    for seconds in (0.003, 0.003, 0.2, 75.0):
        metrics.observe("resolve", "miss", seconds)
    samples = _samples(generate_latest(_export(metrics).registry).decode())
    labels = (("op", "resolve"), ("outcome", "miss"))

    def bucket(le: str) -> float:
        return samples[("assetd_request_seconds_bucket", (("le", le), *labels))]

    buckets = {
        float(dict(key[1])["le"]): value
        for key, value in samples.items()
        if key[0] == "assetd_request_seconds_bucket"
    }
    assert [*BUCKETS, math.inf] == sorted(buckets)
    assert 0.0 == buckets[0.0025]
    assert 2.0 == buckets[0.005]
    assert 2.0 == buckets[0.1]
    assert 3.0 == buckets[0.25]
    assert 3.0 == buckets[60.0]
    assert 4.0 == bucket("+Inf")
    assert 4.0 == samples[("assetd_request_seconds_count", labels)]
    assert pytest.approx(75.206) == samples[("assetd_request_seconds_sum", labels)]


def test_prometheus_reads_stats_on_each_scrape() -> None:
    """Each scrape calls stats() again: the export is never a stale snapshot."""
    figures = fake_stats()
    export = PrometheusExport(lambda: figures, Metrics(), listen=None, textfile=None)
    assert 3.0 == _samples(generate_latest(export.registry).decode())[("assetd_cache_entries", ())]
    figures["entries"] = 11
    assert 11.0 == _samples(generate_latest(export.registry).decode())[("assetd_cache_entries", ())]


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:9100",
        "10.1.2.3:9100",
        "[::]:9100",
        "192.168.0.1:9100",
        "example.com:9100",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "127.0.0.1:http",
        "127.0.0.1",
    ],
)
def test_metrics_listen_refuses_non_loopback_or_bad_port(listen: str) -> None:
    """A non-loopback host or a port outside 1-65535 (0 included) fails naming metrics.listen."""
    with pytest.raises(ConfigError) as info:
        _export(listen=listen)
    assert str(info.value).startswith("metrics.listen: ")
    assert repr(listen) in str(info.value)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("127.0.0.2:9100", ("127.0.0.2", 9100)),
        ("localhost:9100", ("localhost", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        (":9100", ("127.0.0.1", 9100)),
        ("127.0.0.1:65535", ("127.0.0.1", 65535)),
    ],
)
def test_metrics_listen_accepts_loopback(listen: str, expected: tuple[str, int]) -> None:
    """Loopback addresses (v4, v6, localhost, empty host) with a valid port are accepted."""
    assert expected == _export(listen=listen).listen


def test_metrics_off_by_default() -> None:
    """Without listen, socket or textfile, nothing is served or written."""
    export = _export()
    assert None is export.listen

    async def run() -> int:
        export.start()
        await export.serve()
        served = len(export._servers)
        export.close_servers()
        return served

    assert 0 == asyncio.run(run())
    export.stop()


class _Served:
    """An export serving /metrics on an event loop in a background thread."""

    def __init__(self, export: PrometheusExport, unix_sock: socket.socket | None = None,
                 admit: Any = None) -> None:  # fmt: skip
        self.export = export
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        kwargs = {} if admit is None else {"admit": admit}
        asyncio.run_coroutine_threadsafe(export.serve(unix_sock, **kwargs), self.loop).result(10)

    def threads(self) -> int:
        return threading.active_count()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.export.close_servers)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_loopback_listen_serves_metrics() -> None:
    """A loopback listen address really serves /metrics over HTTP."""
    port = _free_port()
    served = _Served(_export(listen=f"127.0.0.1:{port}"))
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert 200 == response.status
            body = response.read().decode()
    finally:
        served.close()
    assert 3.0 == _samples(body)[("assetd_cache_entries", ())]
    assert 'assetd_resolves_total{cache="hit"} 5.0' in body


def _raw(address: Any, payload: bytes, family: int = socket.AF_INET) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_unknown_path_and_method_are_refused() -> None:
    """Only GET or HEAD of /metrics (or /) is answered with the exposition."""
    port = _free_port()
    served = _Served(_export(listen=f"127.0.0.1:{port}"))
    try:
        addr = ("127.0.0.1", port)
        other = _raw(addr, b"GET /secrets HTTP/1.1\r\nHost: x\r\n\r\n")
        post = _raw(addr, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = _raw(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    finally:
        served.close()
    assert other.startswith(b"HTTP/1.1 404 ")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert (True, True) == (head.startswith(b"HTTP/1.1 200 "), head.endswith(b"\r\n\r\n"))


def test_metrics_flood_starts_no_thread_and_is_capped() -> None:
    """300 connections that each send a bare request line: no new thread, 16 held at most."""
    port = _free_port()
    export = _export(listen=f"127.0.0.1:{port}")
    served = _Served(export)
    before = served.threads()
    socks = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            socks.append(sock)
        time.sleep(0.5)
        held, threads = export.open, served.threads()
    finally:
        for sock in socks:
            sock.close()
        served.close()
    assert (True, PrometheusExport.MAX_CONNECTIONS) == (threads <= before, held)
    assert 300 - PrometheusExport.MAX_CONNECTIONS == export.refused


def test_slow_scrape_is_closed_after_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape that never finishes its request is closed after TIMEOUT_S."""
    monkeypatch.setattr(PrometheusExport, "TIMEOUT_S", 0.3)
    port = _free_port()
    export = _export(listen=f"127.0.0.1:{port}")
    served = _Served(export)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                assert b"" == sock.recv(100)
            took = time.monotonic() - started
    finally:
        served.close()
    assert took < 5
    assert 0 == export.open


def test_unix_socket_admits_and_refuses_by_peer(tmp_path: Path) -> None:
    """On metrics.socket the admit check decides: admitted peers get 200, others 403."""
    path = str(tmp_path / "m.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    verdicts = [True, False]
    served = _Served(_export(), listener, admit=lambda _sock: verdicts.pop(0))
    try:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        admitted = _raw(path, request, socket.AF_UNIX)
        refused = _raw(path, request, socket.AF_UNIX)
    finally:
        served.close()
    assert admitted.startswith(b"HTTP/1.1 200 ")
    assert b"assetd_cache_entries 3.0" in admitted
    assert (True, False) == (refused.startswith(b"HTTP/1.1 403 "), b"assetd_" in refused)


def test_a_slow_stats_does_not_block_the_event_loop() -> None:
    """While stats() waits (e.g. on start-up recovery), the loop keeps running other work."""
    release = threading.Event()

    def stats() -> dict[str, Any]:
        release.wait(10)  # Daemon.stats waits here on store.totals() until recovery ends
        return fake_stats()

    port = _free_port()
    served = _Served(PrometheusExport(stats, Metrics(), listen=f"127.0.0.1:{port}", textfile=None))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)  # the scrape is now waiting on stats()
            tick = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), served.loop)
            with contextlib.suppress(TimeoutError):
                tick.result(2)
            loop_ran = tick.done()
            release.set()
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    finally:
        release.set()
        served.close()
    assert (True, True) == (loop_ran, answer.startswith(b"HTTP/1.1 200 "))
    assert b"assetd_cache_entries 3.0" in answer


def test_render_is_cached_for_a_second() -> None:
    """Scrapes within CACHE_S share one rendering: a flood cannot make stats() run per request."""
    calls = []

    def stats() -> dict[str, Any]:
        calls.append(1)
        return fake_stats()

    export = PrometheusExport(stats, Metrics(), listen=None, textfile=None)
    for _ in range(50):
        export.render()
    assert 1 == len(calls)


def test_textfile_written(tmp_path: Path) -> None:
    """write_textfile writes the exposition to the configured file."""
    target = tmp_path / "assetd.prom"
    export = _export(textfile=str(target))
    export.write_textfile()
    samples = _samples(target.read_text())
    assert 3.0 == samples[("assetd_cache_entries", ())]
    assert 2.0 == samples[("assetd_errors_total", (("code", "not_found"),))]
    assert ["assetd.prom"] == sorted(os.listdir(tmp_path))


def test_textfile_replaced_atomically(tmp_path: Path) -> None:
    """A rewrite replaces the file by rename: a reader of the old file sees it whole."""
    target = tmp_path / "assetd.prom"
    target.write_text("old content\n")
    with target.open() as reader:
        old_inode = os.fstat(reader.fileno()).st_ino
        _export(textfile=str(target)).write_textfile()
        assert "old content\n" == reader.read()  # not truncated and rewritten in place
    assert old_inode != target.stat().st_ino
    assert "assetd_cache_entries 3.0" in target.read_text()
    assert ["assetd.prom"] == sorted(os.listdir(tmp_path))


def test_textfile_failed_write_keeps_old_file(tmp_path: Path) -> None:
    """If collecting fails, the previous file stays intact and no temp file is left."""
    target = tmp_path / "assetd.prom"
    target.write_text("previous\n")

    def broken() -> dict[str, Any]:
        raise RuntimeError("store closed")

    export = PrometheusExport(broken, Metrics(), listen=None, textfile=str(target))
    with pytest.raises(RuntimeError):
        export.write_textfile()
    assert "previous\n" == target.read_text()
    assert ["assetd.prom"] == sorted(os.listdir(tmp_path))


def test_stop_writes_a_last_textfile(tmp_path: Path) -> None:
    """stop() writes the textfile one last time."""
    target = tmp_path / "assetd.prom"
    export = _export(textfile=str(target))
    export.stop()
    assert "assetd_cache_entries 3.0" in target.read_text()
