"""Unit tests for assetd.server's connection policy: peer groups, peer check, throttled logs.

The daemon as a whole runs as a subprocess in tests/integration and tests/hostile.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from assetd import server
from assetd.config import Config, DaemonConfig, load_config
from assetd.fetcher.memory import MemoryFetcher
from assetd.service import AssetService
from assetd.store import Store


def test_peer_groups_are_the_kernels_record() -> None:
    """SO_PEERGROUPS on a socketpair made with groups 4242, 4343 gives exactly those (as root)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the groups, so this process keeps its own
        try:
            os.setgroups([4242, 4343])
            left, _right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            os.write(write_fd, repr(sorted(server.peer_groups(left))).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        seen = reader.read()
    os.waitpid(pid, 0)
    assert "[4242, 4343]" == seen


def test_peer_groups_beyond_256_are_all_read() -> None:
    """A peer in 300 supplementary groups (NGROUPS_MAX is 65536): all 300 are seen, as root."""
    wanted = list(range(10_000, 10_300))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups(wanted)
            left, _right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            os.write(write_fd, repr(sorted(server.peer_groups(left))).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        seen = reader.read()
    os.waitpid(pid, 0)
    assert repr(wanted) == seen


def test_peer_groups_of_a_non_unix_socket_is_empty() -> None:
    """A socket the option does not apply to gives no groups, not an error."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert frozenset() == server.peer_groups(sock)


def _allowed(uids: tuple[int, ...], gids: tuple[int, ...], uid: int, gid: int,
             groups: frozenset[int]) -> tuple[bool, int]:  # fmt: skip
    """peer_allowed's verdict, and how many times it asked for the groups."""
    asked = []

    def read_groups() -> frozenset[int]:
        asked.append(1)
        return groups

    config = Config(daemon=DaemonConfig(allowed_uids=uids, allowed_gids=gids))
    verdict = server.Daemon.peer_allowed(
        SimpleNamespace(config=config),  # type: ignore[arg-type]
        uid,
        gid,
        read_groups,
    )
    return verdict, len(asked)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (((), (), 1000, 1000, frozenset()), (True, 0)),  # no lists: the socket's mode decides
        (((1000,), (), 1000, 5, frozenset()), (True, 0)),  # by uid, groups never read
        (((), (50,), 7, 50, frozenset()), (True, 0)),  # by primary gid
        (((0,), (50,), 7, 8, frozenset({9, 50})), (True, 1)),  # by a supplementary group
        (((0,), (50,), 7, 8, frozenset({9})), (False, 1)),  # none matches
        (((0,), (), 7, 50, frozenset({50})), (False, 0)),  # no gids listed: groups do not matter
    ],
)
def test_peer_allowed(case: tuple[Any, ...], expected: tuple[bool, int]) -> None:
    """Admitted by uid, primary gid or supplementary group; groups read only when they decide."""
    assert expected == _allowed(*case)


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


def test_throttled_warns_once_per_interval_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 warnings in one interval give one line; the next line says how many were left out."""
    recorder = _Recorder()
    clock = [100.0]
    monkeypatch.setattr(server, "log", recorder)
    monkeypatch.setattr(server.time, "monotonic", lambda: clock[0])
    throttled = server._Throttled("peer refused", every_s=10.0)
    for _ in range(1000):
        throttled.warn(uid=7)
    clock[0] += 10.0
    throttled.warn(uid=8)
    assert [("peer refused", {"uid": 7}), ("peer refused", {"uid": 8, "suppressed": 999})] == (
        recorder.lines
    )


class _Transport:
    """Just enough of an asyncio transport to drive a _Connection by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written = b""
        self.reading = True
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return self.sock if name == "socket" else None

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[server.Daemon]:
    """A daemon never started: its connections are driven by hand."""
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "cache")})
    store = Store(cfg.cache.dir, lock=True)
    d = server.Daemon(cfg, AssetService(cfg, MemoryFetcher(), store))
    yield d
    d.requests.shutdown(wait=False)
    d.prefetches.shutdown(wait=False)
    d.service.close()
    store.close()
    d.loop.close()


def test_a_line_we_stopped_reading_is_not_timed_out(daemon: server.Daemon) -> None:
    """A line held up by our own pause (client not reading answers) gets no line timeout."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport = _Transport(left)
    conn = server._Connection(daemon)
    try:
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(b'{"op":"pi')  # a line starts
        conn.pause_writing()  # earlier answers filled the buffer: the client is not reading
        conn.data_received(b'ng","id":1}\n')  # the line is finished; we do not handle it yet
        later = daemon.loop.time() + daemon.config.daemon.line_timeout_s + 1
        conn.expire(later)  # within idle_timeout_s: the stalled-reader rule does not apply yet
        seen = (transport.written, transport.closed, transport.reading)
        conn.resume_writing()  # the client reads again: the line is answered
    finally:
        left.close()
        right.close()
    assert (b"", False, False) == seen
    assert b'{"id":1,"ok":true,' in transport.written
