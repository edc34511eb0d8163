"""Counters and latency histograms: the ``stats`` op and Prometheus text.

One source of truth: the service's counters, the store's totals and the
histograms kept here feed both ``stats`` and the Prometheus exposition, which
is off by default and served only on a loopback port or written to a
textfile (``[metrics] listen`` / ``textfile``).
"""

from __future__ import annotations

import bisect
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from assetd.errors import ConfigError

__all__ = ["Histogram", "Metrics", "PrometheusExport"]

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


class PrometheusExport:
    """Serve or write the Prometheus text exposition; off unless configured."""

    TEXTFILE_EVERY_S = 15.0

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
        self._stop = threading.Event()
        self._server: Any = None

    def start(self) -> None:
        if self.listen is not None:
            self._server, _ = start_http_server(
                self.listen[1], addr=self.listen[0], registry=self.registry
            )
        if self.textfile:
            threading.Thread(target=self._write_loop, name="assetd-metrics", daemon=True).start()

    def write_textfile(self) -> None:
        if self.textfile:
            write_to_textfile(self.textfile, self.registry)

    def _write_loop(self) -> None:
        while not self._stop.wait(self.TEXTFILE_EVERY_S):
            self.write_textfile()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.write_textfile()
