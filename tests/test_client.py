"""Unit tests for assetd.client.AssetdClient against a scripted fake daemon on a Unix socket."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import errors
from assetd.client import DEFAULT_SOCKET, AssetdClient, AssetdClientPool, DaemonUnreachable
from assetd.protocol import Resolved
from tests.support.fakedaemon import FakeDaemon, Script

SHA = "ab" * 32


def resolved_body(source: str = "s3://b/k", cache: str = "miss", size: int = 10) -> dict[str, Any]:
    """The members of a successful resolve answer, as DESIGN.md shows them."""
    return {
        "source": source,
        "path": f"/var/cache/assetd/blobs/sha256/ab/{SHA}",
        "size": size,
        "sha256": SHA,
        "etag": '"0123456789abcdef0123456789abcdef"',
        "version_id": None,
        "cache": cache,
        "pinned_until": 1764150000.0,
    }


@pytest.fixture
def serve(sock_path: str) -> Iterator[Callable[..., FakeDaemon]]:
    """Start a FakeDaemon on sock_path with a given script; stopped after the test."""
    started: list[FakeDaemon] = []

    def start(script: Script, **kwargs: Any) -> FakeDaemon:
        daemon = FakeDaemon(sock_path, script, **kwargs).__enter__()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.__exit__()


def test_ping_returns_version(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """ping returns the version string the daemon sent."""
    fake = serve(lambda req: {"version": "9.9.9"})
    with AssetdClient(sock_path, timeout=5) as client:
        assert "9.9.9" == client.ping()
    assert "ping" == fake.requests[0]["op"]


def test_resolve_returns_resolved(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """resolve turns a success answer into the matching Resolved."""
    serve(lambda req: resolved_body(req["source"], cache="hit", size=48213))
    with AssetdClient(sock_path, timeout=5) as client:
        res = client.resolve("s3://b/data.csv")
    assert Resolved.from_dict(resolved_body("s3://b/data.csv", cache="hit", size=48213)) == res
    assert Path(f"/var/cache/assetd/blobs/sha256/ab/{SHA}") == res.path
    assert "hit" == res.cache


def test_resolve_sends_only_given_fields(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """resolve sends version_id, timeout_s and job only when given."""
    fake = serve(lambda req: resolved_body(req["source"]))
    with AssetdClient(sock_path, timeout=5) as client:
        client.resolve("s3://b/k")
        client.resolve("s3://b/k", "v1", timeout_s=2.5, job="job-1")
    assert {"id": 1, "op": "resolve", "source": "s3://b/k"} == fake.requests[0]
    assert {
        "id": 2,
        "op": "resolve",
        "source": "s3://b/k",
        "version_id": "v1",
        "timeout_s": 2.5,
        "job": "job-1",
    } == fake.requests[1]


def test_error_answer_raises_matching_class(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A not_found answer raises errors.NotFound with the daemon's message."""
    serve(
        lambda req: {
            "ok": False,
            "error": {"code": "not_found", "message": "object does not exist", "retryable": False},
        }
    )
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(errors.NotFound) as info:
        client.resolve("s3://b/missing")
    assert errors.NotFound is type(info.value)
    assert "object does not exist" == info.value.message
    assert "not_found" == info.value.code


@pytest.mark.parametrize("code", errors.CODES)
def test_every_wire_code_raises_its_class(
    serve: Callable[..., FakeDaemon], sock_path: str, code: str
) -> None:
    """Each design error code comes back as its own class."""
    cls = errors.error_class(code)
    serve(
        lambda req: {
            "ok": False,
            "error": {"code": code, "message": "m", "retryable": cls.retryable},
        }
    )
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(errors.AssetError) as info:
        client.resolve("s3://b/k")
    assert cls is type(info.value)


def test_unknown_error_code_is_kept(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """An error code this client does not know keeps its code, message and retryable flag."""
    serve(
        lambda req: {
            "ok": False,
            "error": {"code": "quota_exceeded", "message": "slow down", "retryable": True},
        }
    )
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(errors.AssetError) as info:
        client.resolve("s3://b/k")
    assert "quota_exceeded" == info.value.code
    assert "slow down" == info.value.message
    assert True is info.value.retryable


def test_prefetch_maps_mixed_results_in_order(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """prefetch gives one Resolved or AssetError per source, in request order."""
    not_allowed = {"code": "not_allowed", "message": "bucket not allowed", "retryable": False}
    fake = serve(
        lambda req: {
            "results": [
                {"ok": True, **resolved_body("s3://b/one", cache="hit")},
                {"ok": False, "error": not_allowed},
                {"ok": True, **resolved_body("s3://b/three", cache="miss")},
            ]
        }
    )
    with AssetdClient(sock_path, timeout=5) as client:
        results = client.prefetch(["s3://b/one", ("s3://x/two", "v2"), "s3://b/three"])
    assert 3 == len(results)
    first, second, third = results
    assert isinstance(first, Resolved)
    assert "s3://b/one" == first.source
    assert "hit" == first.cache
    assert errors.NotAllowed("bucket not allowed") == second
    assert errors.NotAllowed is type(second)
    assert isinstance(third, Resolved)
    assert "s3://b/three" == third.source
    assert [
        "s3://b/one",
        {"source": "s3://x/two", "version_id": "v2"},
        "s3://b/three",
    ] == fake.requests[0]["sources"]


def test_prefetch_sends_timeout(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """prefetch passes timeout_s through to the daemon."""
    fake = serve(lambda req: {"results": []})
    with AssetdClient(sock_path, timeout=5) as client:
        assert [] == client.prefetch([], timeout_s=7.0)
    assert 7.0 == fake.requests[0]["timeout_s"]


def test_prefetch_result_count_mismatch(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """A daemon answering the wrong number of results is refused, not zipped short."""
    serve(lambda req: {"results": [{"ok": True, **resolved_body()}]})
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(errors.BadRequest):
        client.prefetch(["s3://b/a", "s3://b/b"])


def test_prefetch_request_level_error_raises(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A failed prefetch request as a whole raises its error."""
    serve(
        lambda req: {
            "ok": False,
            "error": {"code": "bad_request", "message": "too many", "retryable": False},
        }
    )
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(errors.BadRequest):
        client.prefetch(["s3://b/a"])


def test_stats_strips_id_and_ok(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """stats returns the daemon's figures without the envelope's id and ok."""
    figures = {
        "entries": 2,
        "bytes": 30,
        "hits": 5,
        "misses": 2,
        "coalesced": 0,
        "stale": 0,
        "errors": {"not_found": 1},
        "bytes_fetched": 30,
        "s3_requests": {"head": 2, "get": 2},
    }
    serve(lambda req: figures)
    with AssetdClient(sock_path, timeout=5) as client:
        assert figures == client.stats()


def test_request_ids_increase(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """Each call carries a fresh, increasing integer id on the kept connection."""
    fake = serve(lambda req: {"version": "1"})
    with AssetdClient(sock_path, timeout=5) as client:
        for _ in range(4):
            client.ping()
    assert [1, 2, 3, 4] == [r["id"] for r in fake.requests]
    assert 1 == fake.connections


def test_call_returns_failure_answers(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """call() hands back an ok:false answer without raising."""
    error = {"code": "bad_request", "message": "unknown op 'x'", "retryable": False}
    serve(lambda req: {"ok": False, "error": error})
    with AssetdClient(sock_path, timeout=5) as client:
        assert {"id": 1, "ok": False, "error": error} == client.call({"op": "x"})


def test_missing_socket_raises_daemon_unreachable(tmp_path: Path) -> None:
    """A socket path with nothing behind it raises DaemonUnreachable with the set message."""
    path = str(tmp_path / "absent.sock")
    with AssetdClient(path, timeout=1) as client, pytest.raises(DaemonUnreachable) as info:
        client.resolve("s3://b/k")
    message = info.value.message
    assert "cannot reach the assetd daemon: No such file or directory; is the service running?" == (
        message
    )
    assert path not in message  # a message may reach a verdict: no host path
    assert f"cannot reach assetd at {path}: No such file or directory; is the service running?" == (
        info.value.for_operator()
    )
    assert "unavailable" == info.value.code
    assert True is info.value.retryable
    assert isinstance(info.value, errors.Unavailable)
    assert path == info.value.socket_path
    assert message == str(info.value)


def test_socket_path_is_not_a_socket(tmp_path: Path) -> None:
    """A regular file at the socket path is unreachable too (connection refused)."""
    path = tmp_path / "plain.sock"
    path.write_text("")
    with AssetdClient(str(path), timeout=1) as client, pytest.raises(DaemonUnreachable) as info:
        client.ping()
    assert info.value.for_operator().startswith(f"cannot reach assetd at {path}: ")
    assert info.value.message.endswith("; is the service running?")


def test_reconnects_once_after_server_closed(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A kept connection the daemon closed is replaced transparently on the next call."""
    fake = serve(lambda req: {"version": "1"}, close_after_answer=True)
    with AssetdClient(sock_path, timeout=5) as client:
        assert "1" == client.ping()
        time.sleep(0.05)  # let the server close its end
        assert "1" == client.ping()
        assert "1" == client.ping()
    assert 3 == fake.connections
    assert [1, 2, 3] == [r["id"] for r in fake.requests]


def test_daemon_gone_after_first_call(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """A daemon that went away between calls raises DaemonUnreachable on the next one."""
    fake = serve(lambda req: {"version": "1"}, close_after_answer=True)
    with AssetdClient(sock_path, timeout=5) as client:
        assert "1" == client.ping()
        fake.__exit__()
        Path(sock_path).unlink()
        with pytest.raises(DaemonUnreachable) as info:
            client.ping()
    assert info.value.for_operator().startswith(f"cannot reach assetd at {sock_path}: ")


def test_partial_answer_then_close_on_fresh_connection(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """An answer cut off before its newline on a fresh connection is DaemonUnreachable."""
    serve(lambda req: b'{"id":1,"ok":tr', close_after_answer=True)
    with AssetdClient(sock_path, timeout=5) as client, pytest.raises(DaemonUnreachable):
        client.ping()


def test_silent_server_times_out_as_unavailable(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A daemon that accepts but never answers gives Unavailable after the client timeout."""
    serve(lambda req: None)
    with AssetdClient(sock_path, timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as info:
            client.resolve("s3://b/k")
        took = time.monotonic() - started
    assert errors.Unavailable is type(info.value)  # a timeout, not "unreachable"
    assert "unavailable" == info.value.code
    assert 0.25 <= took < 3.0


def test_client_recovers_after_timeout(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """After a timed-out call the client opens a fresh connection for the next one."""
    fake = serve(lambda req: None if req["op"] == "resolve" else {"version": "2"})
    with AssetdClient(sock_path, timeout=0.3) as client:
        with pytest.raises(errors.Unavailable):
            client.resolve("s3://b/k")
        assert "2" == client.ping()
    assert 2 == fake.connections


def test_env_socket_used_without_path(
    serve: Callable[..., FakeDaemon], sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ASSETD_SOCKET names the socket when no path is given."""
    monkeypatch.setenv("ASSETD_SOCKET", sock_path)
    serve(lambda req: {"version": "env"})
    with AssetdClient(timeout=5) as client:
        assert sock_path == client.socket_path
        assert "env" == client.ping()


def test_explicit_path_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit socket path wins over ASSETD_SOCKET."""
    monkeypatch.setenv("ASSETD_SOCKET", "/from/env.sock")
    assert "/given.sock" == AssetdClient("/given.sock").socket_path


def test_default_socket_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a path or ASSETD_SOCKET, the client uses DESIGN.md's default socket."""
    monkeypatch.delenv("ASSETD_SOCKET", raising=False)
    assert "/run/assetd/assetd.sock" == DEFAULT_SOCKET
    assert DEFAULT_SOCKET == AssetdClient().socket_path


def test_client_is_thread_safe(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """Concurrent calls from several threads each get their own answer."""
    serve(lambda req: resolved_body(req["source"]))
    seen: list[str] = []
    lock = threading.Lock()
    with AssetdClient(sock_path, timeout=5) as client:

        def work(n: int) -> None:
            for i in range(10):
                src = f"s3://b/{n}-{i}"
                res = client.resolve(src)
                with lock:
                    seen.append(res.source if res.source == src else f"MISMATCH {src}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(f"s3://b/{n}-{i}" for n in range(4) for i in range(10)) == sorted(seen)


# --- AssetdClientPool ----------------------------------------------------------------------


def test_pool_gives_concurrent_calls_their_own_connection(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A call stuck on a slow answer does not hold up another thread's call."""
    slow_seen = threading.Event()

    def script(req: dict[str, Any]) -> Any:
        if req["source"] == "s3://b/slow":
            slow_seen.set()
            return None  # never answers until the daemon stops
        return resolved_body(req["source"])

    daemon = serve(script)
    with AssetdClientPool(sock_path, timeout=20) as pool:
        stuck = threading.Thread(target=lambda: _swallow(pool.resolve, "s3://b/slow"))
        stuck.start()
        assert slow_seen.wait(5)
        assert "s3://b/fast" == pool.resolve("s3://b/fast").source
        # answered while the slow call is still waiting: not queued behind it
        assert (True, 2) == (stuck.is_alive(), daemon.connections)
        daemon.released.set()
        stuck.join(30)


def _swallow(call: Callable[..., Any], *args: Any) -> None:
    with contextlib.suppress(errors.AssetError):
        call(*args)


def test_pool_reuses_one_connection_for_sequential_calls(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """One thread calling again and again uses a single connection."""
    daemon = serve(lambda req: resolved_body(req["source"]))
    with AssetdClientPool(sock_path, timeout=5) as pool:
        for i in range(5):
            pool.resolve(f"s3://b/{i}")
        assert (1, 1) == (daemon.connections, pool.open_connections)


def test_pool_close_closes_its_connections(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """close() leaves no connection open; a later call opens a fresh one."""
    daemon = serve(lambda req: resolved_body(req["source"]))
    pool = AssetdClientPool(sock_path, timeout=5)
    pool.resolve("s3://b/k")
    pool.close()
    assert 0 == pool.open_connections
    assert "s3://b/k2" == pool.resolve("s3://b/k2").source
    assert 2 == daemon.connections
    pool.close()


def test_pool_errors_keep_their_codes(serve: Callable[..., FakeDaemon], sock_path: str) -> None:
    """A daemon error answer raises its class through the pool, and the connection is kept."""
    serve(lambda req: {"ok": False, "error": {"code": "not_found", "message": "gone"}})
    with AssetdClientPool(sock_path, timeout=5) as pool:
        with pytest.raises(errors.NotFound):
            pool.resolve("s3://b/k")
        assert 1 == pool.open_connections


def test_pool_close_during_a_call_closes_that_connection_after(
    serve: Callable[..., FakeDaemon], sock_path: str
) -> None:
    """A connection in use when close() runs is closed when its call returns, not kept."""
    asked = threading.Event()
    go = threading.Event()

    def script(req: dict[str, Any]) -> Any:
        asked.set()
        go.wait(10)
        return resolved_body(req["source"])

    serve(script)
    pool = AssetdClientPool(sock_path, timeout=20)
    call = threading.Thread(target=pool.resolve, args=("s3://b/k",))
    call.start()
    assert asked.wait(5)
    pool.close()
    go.set()
    call.join(10)
    assert 0 == pool.open_connections


def test_connect_waits_out_a_full_listen_backlog(sock_path: str) -> None:
    """A daemon whose backlog is full is busy, not down: connect waits for room."""
    import json
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(0)
    server.settimeout(10)  # a client that gave up must not hang the test
    fillers = []
    for _ in range(64):  # fill the backlog until the kernel refuses more
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(sock_path)
        except BlockingIOError:
            s.close()
            break
        fillers.append(s)
    result: dict[str, Any] = {}

    def ping() -> None:
        try:
            result["version"] = AssetdClient(sock_path, timeout=10).ping()
        except errors.AssetError as exc:
            result["error"] = exc

    thread = threading.Thread(target=ping)
    thread.start()
    time.sleep(0.2)  # the client meets the full backlog first
    accepted = [server.accept()[0] for _ in fillers]  # room again
    conn, _ = server.accept()
    request = json.loads(conn.makefile("rb").readline())
    conn.sendall(json.dumps({"id": request["id"], "ok": True, "version": "9"}).encode() + b"\n")
    thread.join(10)
    for s in [*fillers, *accepted, conn, server]:
        s.close()
    assert {"version": "9"} == result
