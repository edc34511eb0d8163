"""Peer groups from the kernel, reload and the negative cache, a wrong-family activated socket."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.conftest import BUCKET, Factory
from tests.support.daemon import OTHER_UID_PYTHON, DaemonProcess, ping_as_nobody
from tests.support.seaweedfs import clean_env

pytestmark = pytest.mark.integration
GRADERS_GID = 4242  # a gid no account has: only the test's clients carry it
OTHER_GID = 4343


def test_supplementary_group_client_admitted_and_other_refused(make_daemon: Factory) -> None:
    """A client whose supplementary groups hold an allowed gid is admitted; another is refused."""
    d = make_daemon(
        daemon={"allowed_uids": [0], "allowed_gids": [GRADERS_GID], "socket_mode": "0666"}
    )
    admitted = ping_as_nobody(d.socket_path, (OTHER_GID, GRADERS_GID))
    refused = ping_as_nobody(d.socket_path, (OTHER_GID,))
    assert (9, True) == (admitted["id"], admitted["ok"])
    assert (9, False, "forbidden") == (refused["id"], refused["ok"], refused["error"]["code"])


def _set_daemon_keys(d: DaemonProcess, old: str, new: str) -> None:
    d.config.write_text(d.config.read_text().replace(old, new))
    d.signal(signal.SIGHUP)


# Connects with groups `before`, switches to `after`, says "ready", waits for "go", pings.
_SWITCHER = """
import os, socket, sys
os.setgroups([int(g) for g in sys.argv[2].split(",") if g])
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
os.setgroups([int(g) for g in sys.argv[3].split(",") if g])
print("ready", flush=True)
sys.stdin.readline()
s.sendall(b'{"op":"ping","id":9}\\n')
print(s.makefile().readline(), flush=True)
"""


def _groups_changed_after_connect(d: DaemonProcess, before: str, after: str) -> dict[str, Any]:
    """A root client (gid 0) connects with ``before``, then holds ``after`` when accepted.

    The daemon is stopped (SIGSTOP) across the connect and the switch, so it
    accepts only after the groups changed: what it sees is what it read when.
    """
    assert d.proc is not None
    d.signal(signal.SIGSTOP)
    try:
        client = subprocess.Popen(
            [sys.executable, "-c", _SWITCHER, d.socket_path, before, after],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert client.stdout is not None and client.stdin is not None
        assert "ready" == client.stdout.readline().strip()
    finally:
        d.signal(signal.SIGCONT)
    client.stdin.write("go\n")
    client.stdin.flush()
    answer: dict[str, Any] = json.loads(client.stdout.readline())
    client.wait(10)
    return answer


def test_peer_groups_are_those_at_connect_not_later(make_daemon: Factory) -> None:
    """Groups are the kernel's record at connect, not what the pid holds when accepted."""
    d = make_daemon(daemon={"allowed_uids": [0]})
    _set_daemon_keys(d, "allowed_uids = [0]", f"allowed_uids = [1]\nallowed_gids = [{GRADERS_GID}]")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and d.request({"op": "ping"})["ok"]:
        time.sleep(0.1)  # until the reload made root (uid 0, gid 0) a stranger
    gained = _groups_changed_after_connect(d, "", str(GRADERS_GID))
    dropped = _groups_changed_after_connect(d, str(GRADERS_GID), "")
    assert (False, "forbidden") == (gained["ok"], gained.get("error", {}).get("code"))
    assert (True, 9) == (dropped["ok"], dropped["id"])


def test_reload_clears_the_negative_cache(make_daemon: Factory, s3: Any) -> None:
    """A key uploaded after a cached not_found resolves right after SIGHUP, within the TTL."""
    d = make_daemon(cache={"negative_ttl_s": 600})
    key = f"hostile/late-{time.monotonic_ns()}.csv"
    source = f"s3://{BUCKET}/{key}"
    first = d.request({"op": "resolve", "source": source})
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"late,1\n")
    cached = d.request({"op": "resolve", "source": source})
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    after = cached
    while time.monotonic() < deadline and not after["ok"]:
        time.sleep(0.2)
        after = d.request({"op": "resolve", "source": source})
    assert ("not_found", "not_found") == (first["error"]["code"], cached["error"]["code"])
    assert (True, "miss") == (after["ok"], after.get("cache"))


def test_tcp_socket_from_activation_is_one_line_and_exit_2(
    make_daemon: Factory, short_tmp: Path
) -> None:
    """LISTEN_FDS naming a TCP socket: exit 2 with one line naming the problem, no traceback."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    d = make_daemon(start=False, name="tcp")
    fd = listener.fileno()
    wrap = (
        "import os,sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    d.argv_prefix = [sys.executable, "-c", wrap, str(fd)]
    d.pass_fds = (fd,)
    with pytest.raises(RuntimeError) as info:
        d.start(timeout=20)
    listener.close()
    lines = [line for line in d.log().splitlines() if line.strip()]
    assert str(info.value).startswith("daemon exited 2:")
    assert ["assetd: cannot start: "] == [line[:22] for line in lines]
    assert "not a Unix stream socket" in lines[0]


_SCRAPE = (
    "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(b'GET /metrics HTTP/1.0\\r\\n\\r\\n'); d=b''\n"
    "while c := s.recv(65536): d += c\n"
    "print(d.decode().splitlines()[0])"
)


def test_metrics_socket_is_gated_like_the_main_socket(
    make_daemon: Factory, short_tmp: Path
) -> None:
    """metrics.socket serves an allowed peer (root) and answers 403 to another uid (nobody)."""
    path = str(short_tmp / "metrics.sock")
    d = make_daemon(daemon={"allowed_uids": [0], "socket_mode": "0666"}, metrics={"socket": path})
    lines = []
    for user in (0, 65534):
        proc = subprocess.run(
            [OTHER_UID_PYTHON, "-c", _SCRAPE, path],
            user=user,
            group=user,
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env(),
            check=False,
        )
        lines.append(proc.stdout.strip() or proc.stderr)
    d.stop()
    assert ["HTTP/1.1 200 OK", "HTTP/1.1 403 Forbidden"] == lines
    assert not Path(path).exists()  # removed at stop, like the main socket
