"""Unit tests for assetd.systemd: sd_notify, socket activation and the watchdog interval."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from assetd import systemd


@pytest.fixture
def clean_systemd_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without any of systemd's variables."""
    for name in (
        "NOTIFY_SOCKET",
        "LISTEN_PID",
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound SOCK_DGRAM Unix socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield sock, path


# -- notify -----------------------------------------------------------------------------


def test_notify_sends_ready(
    clean_systemd_env: pytest.MonkeyPatch, dgram: tuple[socket.socket, str]
) -> None:
    """notify sends the state as one datagram to NOTIFY_SOCKET and returns True."""
    sock, path = dgram
    clean_systemd_env.setenv("NOTIFY_SOCKET", path)
    assert True is systemd.notify("READY=1")
    assert b"READY=1" == sock.recv(4096)


def test_notify_multiline_state(
    clean_systemd_env: pytest.MonkeyPatch, dgram: tuple[socket.socket, str]
) -> None:
    """A multi-line state (READY plus STATUS) travels in a single datagram."""
    sock, path = dgram
    clean_systemd_env.setenv("NOTIFY_SOCKET", path)
    assert True is systemd.notify("READY=1\nSTATUS=serving")
    assert b"READY=1\nSTATUS=serving" == sock.recv(4096)


def test_notify_explicit_env(dgram: tuple[socket.socket, str]) -> None:
    """An env mapping given to notify is used instead of os.environ."""
    sock, path = dgram
    assert True is systemd.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path})
    assert b"WATCHDOG=1" == sock.recv(4096)


def test_notify_abstract_namespace(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """An "@name" NOTIFY_SOCKET is the abstract-namespace socket "\\0name"."""
    name = f"assetd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        clean_systemd_env.setenv("NOTIFY_SOCKET", "@" + name)
        assert True is systemd.notify("READY=1")
        assert b"READY=1" == sock.recv(4096)


def test_notify_without_socket_does_nothing(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET, notify returns False and opens no socket."""
    opened: list[object] = []

    class Spy(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            opened.append(args)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    clean_systemd_env.setattr(socket, "socket", Spy)
    assert False is systemd.notify("READY=1")
    assert False is systemd.notify("READY=1", env={"NOTIFY_SOCKET": ""})
    assert [] == opened


def test_notify_unreachable_socket(clean_systemd_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on gives False, never an exception."""
    clean_systemd_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody.sock"))
    assert False is systemd.notify("READY=1")


def test_notify_to_stream_socket_fails_quietly(
    clean_systemd_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A NOTIFY_SOCKET of the wrong socket type is refused quietly (False)."""
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        stream.bind(path)
        stream.listen(1)
        clean_systemd_env.setenv("NOTIFY_SOCKET", path)
        assert False is systemd.notify("READY=1")


# -- listen_fds -----------------------------------------------------------------------------


def test_listen_fds_other_pid(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """Sockets meant for another process (LISTEN_PID) are not ours."""
    clean_systemd_env.setenv("LISTEN_PID", str(os.getpid() + 1))
    clean_systemd_env.setenv("LISTEN_FDS", "1")
    assert [] == systemd.listen_fds()


def test_listen_fds_not_activated(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """Without LISTEN_PID there are no activated sockets."""
    assert [] == systemd.listen_fds()


@pytest.mark.parametrize(("pid", "fds"), [("abc", "1"), ("self", "x")])
def test_listen_fds_garbage_env(clean_systemd_env: pytest.MonkeyPatch, pid: str, fds: str) -> None:
    """Unparsable LISTEN_PID or LISTEN_FDS mean no activated sockets, not a crash."""
    clean_systemd_env.setenv("LISTEN_PID", str(os.getpid()) if pid == "self" else pid)
    clean_systemd_env.setenv("LISTEN_FDS", fds)
    assert [] == systemd.listen_fds()


@contextlib.contextmanager
def _borrowed_fd3() -> Iterator[None]:
    """Free fd 3 for the test, and put back whatever was there afterwards."""
    fd = systemd.LISTEN_FDS_START
    try:
        saved: int | None = os.dup(fd)
        inheritable = os.get_inheritable(fd)
    except OSError:
        saved, inheritable = None, False
    try:
        yield
    finally:
        if saved is not None:
            os.dup2(saved, fd, inheritable=inheritable)
            os.close(saved)
        else:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_listen_fds_activated_socket(clean_systemd_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """With LISTEN_PID = us and LISTEN_FDS=1, fd 3 comes back as a usable listening socket."""
    path = str(tmp_path / "act.sock")
    clean_systemd_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_systemd_env.setenv("LISTEN_FDS", "1")
    clean_systemd_env.setenv("LISTEN_FDNAMES", "assetd.socket")
    with _borrowed_fd3():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            listener.listen(4)
            os.dup2(listener.fileno(), systemd.LISTEN_FDS_START)
        socks = systemd.listen_fds()
        try:
            assert 1 == len(socks)
            server = socks[0]
            assert systemd.LISTEN_FDS_START == server.fileno()
            assert socket.AF_UNIX == server.family
            assert socket.SOCK_STREAM == server.type
            assert False is os.get_inheritable(server.fileno())
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                assert name not in os.environ
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(2)
                client.connect(path)
                server.settimeout(2)
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"hello")
                    assert b"hello" == conn.recv(16)
        finally:
            for s in socks:
                s.detach()  # fd 3 is closed or restored by _borrowed_fd3, exactly once


def test_listen_fds_keeps_env_when_asked(
    clean_systemd_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """unset=False leaves the LISTEN_* variables in place."""
    clean_systemd_env.setenv("LISTEN_PID", str(os.getpid()))
    clean_systemd_env.setenv("LISTEN_FDS", "0")
    assert [] == systemd.listen_fds(unset=False)
    assert "0" == os.environ["LISTEN_FDS"]
    assert [] == systemd.listen_fds(unset=True)
    assert "LISTEN_FDS" not in os.environ
    assert "LISTEN_PID" not in os.environ


# -- watchdog_interval ----------------------------------------------------------------------


def test_watchdog_interval_half_the_timeout(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC=2000000 (2 s) asks for a ping every 1 s."""
    clean_systemd_env.setenv("WATCHDOG_USEC", "2000000")
    assert 1.0 == systemd.watchdog_interval()


def test_watchdog_interval_for_our_pid(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """WATCHDOG_PID naming this process keeps the watchdog on."""
    clean_systemd_env.setenv("WATCHDOG_USEC", "30000000")
    clean_systemd_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert 15.0 == systemd.watchdog_interval()


def test_watchdog_interval_absent(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """Without WATCHDOG_USEC there is no watchdog."""
    assert None is systemd.watchdog_interval()


def test_watchdog_interval_other_pid(clean_systemd_env: pytest.MonkeyPatch) -> None:
    """A watchdog meant for another process is not ours."""
    clean_systemd_env.setenv("WATCHDOG_USEC", "2000000")
    clean_systemd_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert None is systemd.watchdog_interval()


@pytest.mark.parametrize("usec", ["0", "-5", "soon", ""])
def test_watchdog_interval_bad_values(clean_systemd_env: pytest.MonkeyPatch, usec: str) -> None:
    """Zero, negative or unparsable WATCHDOG_USEC means no watchdog."""
    clean_systemd_env.setenv("WATCHDOG_USEC", usec)
    assert None is systemd.watchdog_interval()
