"""The little of systemd that assetd uses, with no dependency on libsystemd.

- ``notify``: sd_notify(3) over the datagram socket in ``NOTIFY_SOCKET``;
- ``listen_fds``: sockets passed by socket activation (``LISTEN_FDS``);
- ``watchdog_interval``: how often systemd expects ``WATCHDOG=1``.

Every function is a no-op when the daemon is not under systemd.
"""

from __future__ import annotations

import os
import socket

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify", "watchdog_interval"]

LISTEN_FDS_START = 3


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd; False when not under systemd."""
    env = dict(os.environ) if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False  # systemd gone or socket unwritable: the daemon goes on regardless
    return True


def listen_fds(unset: bool = True) -> list[socket.socket]:
    """Sockets systemd passed us, if ``LISTEN_PID`` names this process."""
    try:
        if int(os.environ.get("LISTEN_PID", "0")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    if unset:  # children must not think the sockets are theirs
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half systemd's timeout), or None."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
        pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2_000_000
