"""Counters and latency histograms: the ``stats`` op and Prometheus text.

One source of truth: the service's counters, the store's totals and the
histograms kept here feed both ``stats`` and the Prometheus exposition, which
is off by default and served only on a loopback port, on a Unix socket
gated like the daemon's, or written to a textfile (``[metrics] listen`` /
``socket`` / ``textfile``).

``/metrics`` is served by the daemon's event loop, never a thread per
connection: at most ``MAX_CONNECTIONS`` at once (more are closed at once),
each closed after ``TIMEOUT_S``, and the text rendered at most once per
``CACHE_S`` however many scrapers ask, on one thread of its own: ``stats()``
may wait (on start-up recovery, the store's lock), and the loop must not.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    generate_latest,
    write_to_textfile,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from assetd.errors import ConfigError
from assetd.log import get_logger

__all__ = ["Histogram", "Metrics", "PrometheusExport"]

log = get_logger("assetd.metrics")

# seconds: a hit is tens of microseconds, a cold 256 MiB fetch about half a second
BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Histogram:
    """Fixed-bucket latency histogram, cheap enough for the hit path."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # last slot is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q``.

        None when empty, or when the quantile is above the largest bucket
        (60 s): JSON has no infinity, and ``stats`` must stay strict JSON.
        """
        if not self.n:
            return None
        rank = q * self.n
        seen = 0
        for i, c in enumerate(self.counts[: len(BUCKETS)]):
            seen += c
            if seen >= rank:
                return BUCKETS[i]
        return None


class Metrics:
    """Request latency by op and outcome (cache status or error code)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.latency: dict[tuple[str, str], Histogram] = {}

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        with self._lock:
            hist = self.latency.get((op, outcome))
            if hist is None:
                hist = self.latency[(op, outcome)] = Histogram()
            hist.observe(seconds)

    def snapshot(self) -> list[tuple[tuple[str, str], Histogram]]:
        """Copies of every histogram, sorted by (op, outcome)."""
        with self._lock:
            items = []
            for k, h in self.latency.items():
                copy = Histogram()
                copy.counts, copy.total, copy.n = list(h.counts), h.total, h.n
                items.append((k, copy))
        return sorted(items, key=lambda item: item[0])

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (op, outcome), h in self.snapshot():
            p50, p99 = h.quantile(0.5), h.quantile(0.99)
            out.setdefault(op, {})[outcome] = {
                "count": h.n,
                "p50_le_ms": None if p50 is None else p50 * 1000,
                "p99_le_ms": None if p99 is None else p99 * 1000,
            }
        return out


class _Collector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], metrics: Metrics) -> None:
        self.stats = stats
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        s = self.stats()
        yield GaugeMetricFamily("assetd_cache_entries", "Index entries", value=s["entries"])
        yield GaugeMetricFamily("assetd_cache_bytes", "Bytes of unique blobs", value=s["bytes"])
        resolves = CounterMetricFamily(
            "assetd_resolves", "Successful resolves by cache status", labels=["cache"]
        )
        for status in ("hit", "miss", "coalesced", "stale"):
            resolves.add_metric([status], s[{"hit": "hits", "miss": "misses"}.get(status, status)])
        yield resolves
        errors = CounterMetricFamily("assetd_errors", "Failed requests by code", labels=["code"])
        for code, n in sorted(s["errors"].items()):
            errors.add_metric([code], n)
        yield errors
        yield CounterMetricFamily(
            "assetd_fetched_bytes", "Bytes downloaded from S3", value=s["bytes_fetched"]
        )
        aliases = CounterMetricFamily(
            "assetd_alias_resolves",
            "Successful resolves of asset:// names (names in the running catalog only)",
            labels=["alias", "resolved_source"],
        )
        for name, row in sorted(s.get("aliases", {}).items()):
            aliases.add_metric([name, str(row["resolved_source"])], row["resolves"])
        yield aliases
        s3 = CounterMetricFamily("assetd_s3_requests", "Requests sent to S3", labels=["op"])
        for op, n in sorted(s["s3_requests"].items()):
            s3.add_metric([op], n)
        yield s3
        hist = HistogramMetricFamily(
            "assetd_request_seconds", "Request latency", labels=["op", "outcome"]
        )
        for (op, outcome), h in self.metrics.snapshot():
            cumulative, buckets = 0, []
            for bound, c in zip([*BUCKETS, float("inf")], h.counts, strict=True):
                cumulative += c
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric([op, outcome], buckets, h.total)
        yield hist
        yield from _background_metrics(s)


def _background_metrics(s: dict[str, Any]) -> Iterator[Any]:
    """Background tasks and quarantine (issue 11): a task that fails shows here."""
    ok = GaugeMetricFamily(
        "assetd_background_ok", "1 if the task's last run succeeded", labels=["task"]
    )
    failures = CounterMetricFamily(
        "assetd_background_failures", "Failed runs of a background task", labels=["task"]
    )
    for task, state in sorted(s.get("background", {}).items()):
        ok.add_metric([task], 1.0 if state["ok"] else 0.0)
        failures.add_metric([task], state["total_failures"])
    yield ok
    yield failures
    yield GaugeMetricFamily(
        "assetd_pins_refused",
        "1 while resolves are refused: pins cannot be recorded",
        value=1.0 if s.get("pins_refused") else 0.0,
    )
    quarantine = s.get("quarantine", {})
    yield GaugeMetricFamily(
        "assetd_quarantine_bytes", "Bytes in quarantine/", value=quarantine.get("bytes", 0)
    )


def _loopback(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        loopback, number = False, -1
    if not loopback or not 0 < number < 65536:
        raise ConfigError(f"metrics.listen: expected a loopback host:port, got {listen!r}")
    return host, number


class _Scrape(asyncio.Protocol):
    """One HTTP/1.x request for /metrics, answered and closed; no keep-alive."""

    def __init__(self, export: PrometheusExport, admit: Callable[[socket.socket], bool]) -> None:
        self.export = export
        self.admit = admit
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.allowed = False
        self.taken = False  # the request was read; its answer is being rendered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport = stream
        export = self.export
        if export.open >= export.MAX_CONNECTIONS:
            export.refused += 1
            stream.abort()  # no work at all for a flood: the scraper retries next interval
            return
        export.open += 1
        self.timer = asyncio.get_running_loop().call_later(export.TIMEOUT_S, stream.abort)
        self.allowed = self.admit(stream.get_extra_info("socket"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.export.open -= 1

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self.taken:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            end = self.buf.find(b"\n\n")
        if end < 0:
            if len(self.buf) > 8192:
                self._reply(b"431 Request Header Fields Too Large", b"")
            return
        parts = bytes(self.buf[: self.buf.find(b"\n")]).split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?")[0] if len(parts) > 1 else b""
        if not self.allowed:
            self._reply(b"403 Forbidden", b"forbidden\n")
        elif method not in (b"GET", b"HEAD"):
            self._reply(b"405 Method Not Allowed", b"")
        elif path not in (b"/metrics", b"/"):
            self._reply(b"404 Not Found", b"")
        else:
            # rendered off the loop: stats() may wait (on recovery, the store's lock, the disk)
            future = asyncio.get_running_loop().run_in_executor(
                self.export.renderer, self.export.render
            )
            future.add_done_callback(lambda f: self._rendered(f, method == b"HEAD"))
            self.taken = True  # one request per connection: bytes after it are ignored

    def _rendered(self, future: asyncio.Future[bytes], head_only: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return  # timed out meanwhile
        if future.cancelled() or future.exception() is not None:
            log.warning(
                "metrics render failed",
                error=repr(None if future.cancelled() else future.exception()),
            )
            self._reply(b"500 Internal Server Error", b"")
            return
        body = future.result()
        self._reply(b"200 OK", b"" if head_only else body, len(body))

    def _reply(self, status: bytes, body: bytes, length: int | None = None) -> None:
        assert self.transport is not None
        head = (
            b"HTTP/1.1 " + status + b"\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode()
            + b"\r\nContent-Length: " + str(len(body) if length is None else length).encode()
            + b"\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        self.transport.write(head + body)
        self.transport.close()


class PrometheusExport:
    """Serve or write the Prometheus text exposition; off unless configured."""

    TEXTFILE_EVERY_S = 15.0
    MAX_CONNECTIONS = 16
    TIMEOUT_S = 5.0
    CACHE_S = 1.0

    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        metrics: Metrics,
        *,
        listen: str | None,
        textfile: str | None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(stats, metrics))
        self.listen = _loopback(listen) if listen else None
        self.textfile = textfile
        self.open = 0  # scrape connections open now
        self.refused = 0  # scrape connections closed at once: MAX_CONNECTIONS were open
        self._rendered: tuple[float, bytes] = (-1e18, b"")
        # one thread renders for every scrape: bounded however many connect
        self.renderer = ThreadPoolExecutor(1, thread_name_prefix="assetd-metrics")
        self._stop = threading.Event()
        self._servers: list[asyncio.AbstractServer] = []

    def render(self) -> bytes:
        """The exposition, rendered at most once per CACHE_S."""
        now = time.monotonic()
        if now - self._rendered[0] >= self.CACHE_S:
            self._rendered = (now, generate_latest(self.registry))
        return self._rendered[1]

    async def serve(
        self,
        unix_sock: socket.socket | None = None,
        admit: Callable[[socket.socket], bool] = lambda _sock: True,
    ) -> None:
        """Serve /metrics from the running loop: on ``listen``, and on ``unix_sock`` if given.

        ``admit`` gates the Unix socket's peers as the daemon's own socket is
        gated; the loopback port admits anyone on the host.
        """
        loop = asyncio.get_running_loop()
        if self.listen is not None:
            host, port = self.listen
            self._servers.append(
                await loop.create_server(
                    lambda: _Scrape(self, lambda _sock: True), host, port, backlog=64
                )
            )
        if unix_sock is not None:
            self._servers.append(
                await loop.create_unix_server(lambda: _Scrape(self, admit), sock=unix_sock)
            )

    def start(self) -> None:
        """Start the textfile writer (the endpoints start with :meth:`serve`)."""
        if self.textfile:
            threading.Thread(target=self._write_loop, name="assetd-metrics", daemon=True).start()

    def write_textfile(self) -> None:
        if self.textfile:
            write_to_textfile(self.textfile, self.registry)

    def _write_loop(self) -> None:
        while not self._stop.wait(self.TEXTFILE_EVERY_S):
            self.write_textfile()

    def close_servers(self) -> None:
        """Stop serving /metrics; call on the loop."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    def stop(self) -> None:
        self._stop.set()
        self.renderer.shutdown(wait=False, cancel_futures=True)
        self.write_textfile()
