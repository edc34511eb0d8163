"""The real daemon as a subprocess, over a real socket, against SeaweedFS."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import AssetdClient, errors
from tests.support.daemon import DaemonFactory, DaemonProcess, ping_as_nobody, socket_dir
from tests.support.faultproxy import FaultProxy
from tests.support.seaweedfs import (
    SCOPED_BUCKET,
    SCOPED_KEY,
    SeaweedFS,
    ensure_bucket,
)

pytestmark = pytest.mark.integration
BUCKET = SCOPED_BUCKET
PRIVATE = "private-assets"
CSV = b"id,name,rating\n" + b"".join(b"%d,Resto %d,4\n" % (i, i) for i in range(2000))


@pytest.fixture(scope="module")
def s3(seaweedfs: SeaweedFS) -> Any:
    client = seaweedfs.client()
    for bucket in (BUCKET, PRIVATE):
        ensure_bucket(client, bucket)
    client.put_object(Bucket=BUCKET, Key="datasets/tp2/R.CSV", Body=CSV)
    client.put_object(Bucket=BUCKET, Key="datasets/big.bin", Body=os.urandom(3 << 20))
    client.put_object(Bucket=PRIVATE, Key="datasets/secret.csv", Body=b"secret")
    return client


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short world-traversable dir: sun_path is 108 bytes, and other uids connect."""
    with tempfile.TemporaryDirectory(prefix="ad", dir="/tmp") as tmp:
        yield socket_dir(Path(tmp))


Factory = Callable[..., DaemonProcess]


@pytest.fixture
def make_daemon(seaweedfs: SeaweedFS, s3: Any, short_tmp: Path) -> Iterator[Factory]:
    factory = DaemonFactory(
        short_tmp, seaweedfs.endpoint_url, SCOPED_KEY, s3={"max_object_bytes": "8MiB"}
    )
    yield factory
    factory.stop()


def _lines(sock_path: str, payload: bytes, timeout: float = 10) -> list[dict[str, Any]]:
    """Send raw bytes on one connection; read answers until the daemon closes or goes quiet."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(sock_path)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


# --- every op, success and error ---------------------------------------------------


def test_ping(make_daemon: Factory) -> None:
    """ping answers ok with the daemon's version and echoes the id."""
    d = make_daemon()
    assert {"id": 7, "ok": True, "version": "0.1.0"} == d.request({"op": "ping", "id": 7})


def test_resolve_miss_then_hit(make_daemon: Factory) -> None:
    """The first resolve downloads, the second is a hit at the same read-only path."""
    d = make_daemon()
    first = d.request({"op": "resolve", "source": f"s3://{BUCKET}/datasets/tp2/R.CSV", "id": "a"})
    second = d.request({"op": "resolve", "source": f"s3://{BUCKET}/datasets/tp2/R.CSV"})
    assert ("a", True, "miss") == (first["id"], first["ok"], first["cache"])
    assert ("hit", first["path"]) == (second["cache"], second["path"])
    assert CSV == Path(first["path"]).read_bytes()
    assert hashlib.sha256(CSV).hexdigest() == first["sha256"]
    assert 0o444 == os.stat(first["path"]).st_mode & 0o777
    assert f"/blobs/sha256/{first['sha256'][:2]}/{first['sha256']}" in first["path"]


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (f"s3://{BUCKET}/datasets/missing.csv", "not_found"),
        (f"s3://{PRIVATE}/datasets/secret.csv", "access_denied"),
        ("s3://Bad_Bucket/k", "malformed_uri"),
        ("http://example.com/x.csv", "unsupported_scheme"),
        ("datasets/local.csv", "unsupported_scheme"),
        (f"s3://{BUCKET}/datasets/big.bin", "too_large"),
        ("s3://other-bucket/datasets/x.csv", "not_allowed"),
        (f"s3://{BUCKET}/outside/x.csv", "not_allowed"),
    ],
)
def test_resolve_errors(make_daemon: Factory, source: str, code: str) -> None:
    """Each failure arrives as its stable code, with retryable as DESIGN.md says."""
    d = make_daemon(
        s3_cfg={
            "allowed_buckets": [BUCKET, PRIVATE],
            "allowed_prefixes": ["datasets/"],
            "max_object_bytes": "1MiB",
        }
    )
    answer = d.request({"op": "resolve", "source": source, "id": 1})
    expected_retryable = errors.error_class(code).retryable
    assert (1, False, code, expected_retryable) == (
        answer["id"],
        answer["ok"],
        answer["error"]["code"],
        answer["error"]["retryable"],
    )


def test_resolve_timeout(make_daemon: Factory, seaweedfs: SeaweedFS) -> None:
    """A request whose deadline passes during a stalled download answers timeout in time."""
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    try:
        proxy.add(method="GET", stall=3.0)
        d = make_daemon(endpoint=proxy.url)
        started = time.monotonic()
        answer = d.request(
            {"op": "resolve", "source": f"s3://{BUCKET}/datasets/tp2/R.CSV", "timeout_s": 0.5}
        )
        took = time.monotonic() - started
    finally:
        proxy.stop()
    assert "timeout" == answer["error"]["code"]
    assert took < 2.0


def test_prefetch_mixed(make_daemon: Factory) -> None:
    """prefetch answers one result per source, in order, successes and failures mixed."""
    d = make_daemon()
    answer = d.request(
        {
            "op": "prefetch",
            "id": "p",
            "sources": [
                f"s3://{BUCKET}/datasets/tp2/R.CSV",
                {"source": f"s3://{BUCKET}/datasets/missing.csv"},
                "not a uri at all://",
            ],
        }
    )
    results = answer["results"]
    assert ("p", True, 3) == (answer["id"], answer["ok"], len(results))
    assert (True, "miss") == (results[0]["ok"], results[0]["cache"])
    assert "not_found" == results[1]["error"]["code"]
    assert results[2]["error"]["code"] in ("malformed_uri", "unsupported_scheme")


def test_prefetch_more_sources_than_workers(make_daemon: Factory, s3: Any) -> None:
    """A prefetch of more cold sources than download workers completes; none time out."""
    keys = [f"datasets/many/{i}.csv" for i in range(12)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"n,%d\n" % i)
    d = make_daemon(daemon={"workers": 2})
    answer = d.request(
        {"op": "prefetch", "sources": [f"s3://{BUCKET}/{k}" for k in keys], "timeout_s": 20},
        timeout=40,
    )
    assert ["miss"] * 12 == [r.get("cache") for r in answer["results"]]


def test_prefetch_bad_request(make_daemon: Factory) -> None:
    """prefetch without a list of sources is bad_request."""
    d = make_daemon()
    assert "bad_request" == d.request({"op": "prefetch", "sources": "x"})["error"]["code"]


def test_stats_counts(make_daemon: Factory) -> None:
    """stats reports entries, bytes, hits, misses, errors and S3 requests, as DESIGN.md names."""
    d = make_daemon()
    source = f"s3://{BUCKET}/datasets/tp2/R.CSV"
    d.request({"op": "resolve", "source": source})
    d.request({"op": "resolve", "source": source})
    d.request({"op": "resolve", "source": f"s3://{BUCKET}/datasets/missing.csv"})
    stats = d.request({"op": "stats"})
    assert (1, len(CSV), 1, 1, 0, 0) == (
        stats["entries"],
        stats["bytes"],
        stats["hits"],
        stats["misses"],
        stats["coalesced"],
        stats["stale"],
    )
    assert {"not_found": 1} == stats["errors"]
    assert {"head": 0, "get": 2} == stats["s3_requests"]  # one GET each, no HEAD
    assert len(CSV) == stats["bytes_fetched"]


# --- hostile frames -----------------------------------------------------------------

HOSTILE = [
    ("non-json", b"not json\n", "bad_request"),
    ("non-object", b"[1,2,3]\n", "bad_request"),
    ("unknown-op", b'{"op":"delete"}\n', "bad_request"),
    ("wrong-types", b'{"op":"resolve","source":5}\n', "bad_request"),
    ("bad-timeout", b'{"op":"resolve","source":"s3://a-b/k","timeout_s":-1}\n', "bad_request"),
    ("missing-fields", b'{"op":"resolve"}\n', "bad_request"),
    ("missing-op", b'{"id":1}\n', "bad_request"),
    ("too-long", b'{"op":"ping","pad":"' + b"x" * (70 * 1024) + b'"}\n', "bad_request"),
    ("too-long-no-newline", b"x" * (70 * 1024), "bad_request"),
    ("invalid-utf8", b'{"op":"ping","x":"\xff\xfe"}\n', "bad_request"),
    ("empty-line", b"\n", "bad_request"),
    ("nul-bytes", b"\x00\x00\x00\n", "bad_request"),
]


@pytest.mark.parametrize(("payload", "code"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_frames(make_daemon: Factory, payload: bytes, code: str) -> None:
    """Each bad frame gets exactly one bad_request answer; the daemon still answers ping."""
    d = make_daemon()
    answers = _lines(d.socket_path, payload)
    assert [(code, False)] == [(a["error"]["code"], a["error"]["retryable"]) for a in answers]
    assert d.request({"op": "ping"})["ok"]


def test_bad_frame_keeps_connection_and_order(make_daemon: Factory) -> None:
    """After an ordinary bad frame the connection stays open; answers come in request order."""
    d = make_daemon()
    answers = _lines(
        d.socket_path,
        b'{"op":"ping","id":1}\nnot json\n{"id":3,"op":"resolve","source":"s3://'
        + BUCKET.encode()
        + b'/datasets/tp2/R.CSV"}\n{"op":"ping","id":4}\n',
    )
    assert [1, None, 3, 4] == [a.get("id") for a in answers]
    assert [True, False, True, True] == [a["ok"] for a in answers]


def test_over_long_line_closes_connection(make_daemon: Factory) -> None:
    """A line over 64 KiB gets one bad_request and the connection is closed."""
    d = make_daemon()
    payload = b'{"op":"ping","pad":"' + b"x" * (70 * 1024) + b'"}\n{"op":"ping","id":2}\n'
    answers = _lines(d.socket_path, payload)
    assert [("bad_request", None)] == [(a["error"]["code"], a.get("id")) for a in answers]


# --- single-flight ------------------------------------------------------------------


def test_64_concurrent_resolves_one_get(
    make_daemon: Factory, seaweedfs: SeaweedFS, s3: Any
) -> None:
    """64 concurrent resolves of one uncached 8 MiB object: 1 GET at S3, 64 answers, 1 sha256."""
    data = os.urandom(8 << 20)
    s3.put_object(Bucket=BUCKET, Key="datasets/eight.bin", Body=data)
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    try:
        proxy.add(method="GET", stall=0.5)  # keep the download open while all 64 arrive
        d = make_daemon(
            endpoint=proxy.url, s3_cfg={"max_object_bytes": "16MiB", "part_size": "8MiB"}
        )  # one part: the whole download is one GET
        barrier = threading.Barrier(64)
        answers: list[dict[str, Any]] = []
        lock = threading.Lock()

        def ask() -> None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(60)
                sock.connect(d.socket_path)
                barrier.wait()
                sock.sendall(
                    json.dumps(
                        {"op": "resolve", "source": f"s3://{BUCKET}/datasets/eight.bin"}
                    ).encode()
                    + b"\n"
                )
                answer = json.loads(sock.makefile("rb").readline())
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=ask) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        gets = proxy.counts["GET"]
    finally:
        proxy.stop()
    assert 1 == gets
    assert 64 == sum(1 for a in answers if a["ok"])
    assert {hashlib.sha256(data).hexdigest()} == {a["sha256"] for a in answers}
    assert 1 == sum(1 for a in answers if a["cache"] == "miss")


# --- peers, signals, systemd --------------------------------------------------------


def test_peer_outside_allowed_uids_is_forbidden(make_daemon: Factory) -> None:
    """A client running as another uid (nobody) gets forbidden; root is admitted."""
    d = make_daemon(daemon={"allowed_uids": [0], "socket_mode": "0666"})
    answer = ping_as_nobody(d.socket_path)
    assert (9, False, "forbidden") == (answer["id"], answer["ok"], answer["error"]["code"])
    assert d.request({"op": "ping"})["ok"]


def test_allowed_gid_admits_peer(make_daemon: Factory) -> None:
    """A peer whose gid is in allowed_gids is admitted even if its uid is not listed."""
    d = make_daemon(daemon={"allowed_uids": [0], "allowed_gids": [65534], "socket_mode": "0666"})
    assert (9, True) == tuple(ping_as_nobody(d.socket_path)[k] for k in ("id", "ok"))


def _blobs_are_whole(cache: Path) -> bool:
    for blob in (cache / "blobs" / "sha256").glob("*/*"):
        if hashlib.sha256(blob.read_bytes()).hexdigest() != blob.name:
            return False
    return True


def test_sigterm_during_download(
    make_daemon: Factory, seaweedfs: SeaweedFS, short_tmp: Path
) -> None:
    """SIGTERM mid-download: the request ends cleanly, no partial blob, the socket is gone."""
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    try:
        proxy.add(method="GET", stall=6.0)
        d = make_daemon(endpoint=proxy.url)
        result: dict[str, Any] = {}

        def ask() -> None:
            try:
                result["answer"] = d.request(
                    {"op": "resolve", "source": f"s3://{BUCKET}/datasets/tp2/R.CSV"}, timeout=30
                )
            except (OSError, ValueError) as exc:  # a closed connection is a clean end too
                result["closed"] = repr(exc)

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(0.5)
        started = time.monotonic()
        code = d.stop(timeout=20)
        took = time.monotonic() - started
        asker.join(30)
    finally:
        proxy.stop()
    cache = short_tmp / "d-cache"
    assert 0 == code
    assert took < 15
    answer = result.get("answer")
    assert answer is None or answer["ok"] or answer["error"]["code"] in ("unavailable", "timeout")
    assert not os.path.exists(d.socket_path)
    assert [] == list((cache / "tmp").iterdir())
    assert _blobs_are_whole(cache)


def test_notify_socket_ready_then_stopping(make_daemon: Factory, short_tmp: Path) -> None:
    """Under a test NOTIFY_SOCKET the daemon sends READY=1, then STOPPING=1 on SIGTERM."""
    path = str(short_tmp / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(20)
        d = make_daemon(env={"NOTIFY_SOCKET": path})
        first = notify.recv(4096).decode()
        d.stop()
        messages = [first]
        while "STOPPING=1" not in messages[-1]:
            messages.append(notify.recv(4096).decode())
    assert "READY=1" in messages[0]
    assert "STOPPING=1" in messages[-1]


def test_socket_activation(make_daemon: Factory, short_tmp: Path) -> None:
    """With LISTEN_FDS the daemon serves the socket systemd passed and never unlinks it."""
    path = str(short_tmp / "act.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    d = make_daemon(start=False, name="act")
    d.socket_path = path
    fd = listener.fileno()
    # as systemd does: the socket on fd 3, LISTEN_PID naming the process that execs the daemon
    wrap = (
        "import os,sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.argv[2], sys.argv[2:])"
    )
    d.argv_prefix = [sys.executable, "-c", wrap, str(fd)]
    d.pass_fds = (fd,)
    d.start()
    listener.close()
    assert d.request({"op": "ping"})["ok"]
    d.stop()
    assert os.path.exists(path)


def test_client_survives_restart(make_daemon: Factory) -> None:
    """AssetdClient reconnects by itself after the daemon restarts under it."""
    d = make_daemon()
    source = f"s3://{BUCKET}/datasets/tp2/R.CSV"
    with AssetdClient(d.socket_path, timeout=30) as client:
        before = client.resolve(source)
        d.stop()
        d.start()
        after = client.resolve(source)
    assert (before.sha256, "hit") == (after.sha256, after.cache)


def test_sighup_reloads_allowlist(make_daemon: Factory) -> None:
    """SIGHUP applies a new allowlist without dropping a kept-open connection."""
    d = make_daemon()
    source = f"s3://{BUCKET}/datasets/tp2/R.CSV"
    with AssetdClient(d.socket_path, timeout=30) as client:
        assert "miss" == client.resolve(source).cache
        text = d.config.read_text().replace("[s3]\n", '[s3]\nallowed_buckets = ["elsewhere"]\n')
        d.config.write_text(text)
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        refused = None
        while time.monotonic() < deadline and refused is None:
            try:
                client.resolve(source)
                time.sleep(0.1)
            except errors.NotAllowed as exc:
                refused = exc
        sock_before = client._sock
    assert refused is not None
    assert sock_before is not None


def test_stale_socket_replaced_and_regular_file_refused(
    make_daemon: Factory, short_tmp: Path
) -> None:
    """A stale socket file left by a crash is replaced; a regular file at the path is not."""
    stale = short_tmp / "d.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(stale))
    leftover.close()
    d = make_daemon()
    assert d.request({"op": "ping"})["ok"]
    d.stop()
    (short_tmp / "f.sock").write_text("not a socket")
    blocked = make_daemon(start=False, name="f")
    with pytest.raises(RuntimeError, match="is not a socket"):
        blocked.start(timeout=15)
    assert "not a socket" == (short_tmp / "f.sock").read_text()


def test_resolve_log_has_job_and_no_secrets(make_daemon: Factory) -> None:
    """One JSON log event per resolve, with the caller's job; credentials never appear."""
    d = make_daemon()
    d.request({"op": "resolve", "source": f"s3://{BUCKET}/datasets/tp2/R.CSV", "job": "tp2-42"})
    d.stop()
    events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    resolves = [e for e in events if e.get("event") == "resolve"]
    assert [("tp2-42", "miss")] == [(e["job"], e["cache"]) for e in resolves]
    assert {"source", "sha256", "bytes", "ms", "cache"} <= set(resolves[0])
    assert SCOPED_KEY[1] not in d.log()
    assert "X-Amz-Signature" not in d.log()
