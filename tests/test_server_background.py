"""Unit tests for the daemon's background work and maintenance ops (issue 11, Why 5 and 8).

An in-process Daemon over a MemoryFetcher: the pin flush survives failures
and says so in ``stats``, recovery retries, shutdown on a failing disk is one
log line, and only admins may run ``gc``/``verify``.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import log, server
from assetd.background import Background
from assetd.config import load_config
from assetd.fetcher.memory import MemoryFetcher
from assetd.server import Daemon
from assetd.service import AssetService
from assetd.store import Store


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The daemon's log lines, as JSON."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    yield stream
    log.configure("json", "info", stream=io.StringIO())


def _daemon(tmp_path: Path, **daemon_keys: Any) -> Daemon:
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "cache")})
    cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, **daemon_keys))
    store = Store(cfg.cache.dir, lock=True)
    return Daemon(cfg, AssetService(cfg, MemoryFetcher(), store))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon that is never started: its parts are driven directly."""
    d = _daemon(tmp_path)
    yield d
    d.requests.shutdown(wait=False)
    d.prefetches.shutdown(wait=False)
    d.service.close()
    d.service.store.close()
    d.loop.close()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    log.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_close_on_a_failing_disk_is_one_line_and_status_1(
    daemon: Daemon, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown whose last flush fails: status 1, one error line, no exception (Why 8)."""

    def read_only() -> int:
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(daemon.service.store, "flush", read_only)
    assert 1 == daemon._close()
    errors = [line for line in _lines(logs) if line["level"] == "error"]
    assert ["could not write pins to the index at exit"] == [e["event"] for e in errors]


def test_flush_loop_survives_failures_and_reports_them(
    daemon: Daemon, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing flush is logged, retried, shown in stats; the loop goes on (Why 8)."""
    monkeypatch.setattr(server, "FLUSH_EVERY_S", 0.01)
    daemon.background = Background(base_delay_s=0.01, max_delay_s=0.02)
    outcomes = iter([OSError("disk full"), OSError("disk full"), None, None])
    calls = []
    seen: dict[str, Any] = {}

    def flaky() -> int:
        calls.append(1)
        if len(calls) == 3:  # both failures are recorded before the third try starts
            seen.update(daemon.background.snapshot().get("flush", {}))
        error = next(outcomes, None)
        if error is not None:
            raise error
        return 0

    monkeypatch.setattr(daemon.service.store, "flush", flaky)

    async def run() -> None:
        task = asyncio.ensure_future(daemon._flush_loop())
        deadline = daemon.loop.time() + 10
        while len(calls) < 4 and daemon.loop.time() < deadline and not task.done():
            await asyncio.sleep(0.005)
        task.cancel()

    daemon.loop.run_until_complete(run())
    failing = seen
    stats = daemon.stats()
    assert 4 == len(calls)
    assert (False, 2) == (failing.get("ok"), failing.get("failures"))
    assert (True, 0, 2) == (
        stats["background"]["flush"]["ok"],
        stats["background"]["flush"]["failures"],
        stats["background"]["flush"]["total_failures"],
    )
    assert stats["last_flush_ok"] is not None
    events = [line["event"] for line in _lines(logs)]
    assert "background task failed; retrying" in events
    assert "background task recovered" in events


def test_recovery_is_retried_until_it_succeeds(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up recovery that fails is retried with backoff, not abandoned (Why 8)."""
    daemon.background = Background(base_delay_s=0.01, max_delay_s=0.02)
    real = daemon.service.store.recover
    failures = [OSError("I/O error"), OSError("I/O error")]

    def flaky() -> Any:
        if failures:
            raise failures.pop()
        return real()

    monkeypatch.setattr(daemon.service.store, "recover", flaky)
    daemon._recover()
    state = daemon.background.snapshot()["recovery"]
    assert (True, 2) == (state["ok"], state["total_failures"])
    assert daemon.service.store.recovered.is_set()


@pytest.mark.parametrize(
    ("keys", "peer", "admitted"),
    [
        ({}, (0, 0, ()), True),  # root
        ({}, (4242, 4242, ()), False),
        ({"admin_uids": (4242,)}, (4242, 4242, ()), True),
        ({"admin_gids": (77,)}, (4242, 77, ()), True),
        ({"admin_gids": (77,)}, (4242, 78, ()), False),
        ({"admin_gids": (77,)}, (4242, 78, (77,)), True),  # a supplementary group
    ],
)
def test_admin_check(
    tmp_path: Path, keys: dict[str, Any], peer: tuple[int, int, tuple[int, ...]], admitted: bool
) -> None:
    """gc/verify: root, the daemon's own uid, admin_uids and admin_gids; nobody else."""
    d = _daemon(tmp_path, **keys)
    uid, gid, groups = peer
    try:
        assert admitted == d.admin_allowed(uid, gid, lambda: frozenset(groups))
    finally:
        d.requests.shutdown(wait=False)
        d.prefetches.shutdown(wait=False)
        d.service.store.close()
        d.loop.close()


def test_metrics_show_a_failing_background_task(daemon: Daemon) -> None:
    """assetd_background_ok{task} is 0 while the task fails, 1 once it succeeds again."""
    from prometheus_client import generate_latest

    daemon.background.failed("flush", OSError("disk full"))
    failing = generate_latest(daemon.export.registry).decode()
    daemon.background.ok("flush")
    ok = generate_latest(daemon.export.registry).decode()
    assert 'assetd_background_ok{task="flush"} 0.0' in failing
    assert 'assetd_background_ok{task="flush"} 1.0' in ok
    assert 'assetd_background_failures_total{task="flush"} 1.0' in ok


def test_reload_applies_the_quarantine_limits(tmp_path: Path) -> None:
    """SIGHUP applies cache.quarantine_max_age_s/_bytes, as docs/setup-config.md promises."""
    path = tmp_path / "assetd.toml"
    path.write_text(f'[cache]\ndir = "{tmp_path / "cache"}"\n')
    cfg = load_config(path)
    d = Daemon(cfg, AssetService(cfg, MemoryFetcher(), Store(cfg.cache.dir, lock=True)))
    try:
        path.write_text(
            f'[cache]\ndir = "{tmp_path / "cache"}"\n'
            'quarantine_max_age_s = 60\nquarantine_max_bytes = "1MiB"\n'
        )
        d.reload()
        applied = (d.config.cache.quarantine_max_age_s, d.config.cache.quarantine_max_bytes)
    finally:
        d.requests.shutdown(wait=False)
        d.prefetches.shutdown(wait=False)
        d.service.close()
        d.service.store.close()
        d.loop.close()
    assert (60.0, 1 << 20) == applied


def test_verify_ends_when_the_daemon_stops(daemon: Daemon) -> None:
    """A verify in the daemon stops at shutdown with a retryable error, not after every blob."""
    from assetd.errors import Unavailable

    fetcher = daemon.service.fetcher
    assert isinstance(fetcher, MemoryFetcher)
    for i in range(3):
        fetcher.put("bucket-a", f"k{i}", f"bytes {i}".encode())
        daemon.service.resolve(f"s3://bucket-a/k{i}")
    daemon._stopping.set()  # SIGTERM, grace over: _close waits on the request pool
    with pytest.raises(Unavailable) as info:
        daemon.maintenance("verify")
    assert (True, "unavailable") == (info.value.retryable, info.value.code)
