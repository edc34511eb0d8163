"""The boto3 fetcher: error translation table, and behaviour against a real moto server."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions as bce
import pytest
from botocore.config import Config as BotoConfig

from assetd import errors
from assetd.config import S3Config
from assetd.fetcher import transport
from assetd.fetcher.base import ObjectChanged, RetryPolicy
from assetd.fetcher.s3 import (
    CLIENT_ERROR_CODES,
    EXCEPTION_TYPES,
    S3ErrorResponse,
    S3Fetcher,
    translate_error,
)
from assetd.fetcher.transport import Aborted, BadResponse, RequestTimeout
from assetd.store import Store
from tests.support.faultproxy import FaultProxy
from tests.support.forwardproxy import ForwardProxy
from tests.support.tls import self_signed, server_context

BUCKET = "assetd-tests"

# The contract of translate_error. Removing a mapping from the module, or
# adding one without a line here, fails test_client_error_table_is_complete.
EXPECTED_CLIENT_CODES = {
    "404": "not_found",
    "NoSuchKey": "not_found",
    "NoSuchBucket": "not_found",
    "NoSuchVersion": "not_found",
    "NotFound": "not_found",
    "403": "access_denied",
    "AccessDenied": "access_denied",
    "Forbidden": "access_denied",
    "InvalidAccessKeyId": "access_denied",
    "SignatureDoesNotMatch": "access_denied",
    "RequestTimeTooSkewed": "access_denied",
    "ExpiredToken": "access_denied",
    "InvalidToken": "access_denied",
    "AccountProblem": "access_denied",
    "AllAccessDisabled": "access_denied",
    "KMS.AccessDeniedException": "access_denied",
    "KMS.DisabledException": "access_denied",
    "InvalidObjectState": "access_denied",
    "301": "access_denied",
    "PermanentRedirect": "access_denied",
    "AuthorizationHeaderMalformed": "access_denied",
    "405": "not_found",
    "MethodNotAllowed": "not_found",
    "400": "bad_request",
    "InvalidArgument": "bad_request",
    "InvalidRequest": "bad_request",
    "500": "unavailable",
    "502": "unavailable",
    "503": "unavailable",
    "504": "unavailable",
    "429": "unavailable",
    "InternalError": "unavailable",
    "ServiceUnavailable": "unavailable",
    "SlowDown": "unavailable",
    "Throttling": "unavailable",
    "ThrottlingException": "unavailable",
    "RequestTimeout": "unavailable",
    "RequestLimitExceeded": "unavailable",
    "TooManyRequests": "unavailable",
}

EXPECTED_EXCEPTIONS: list[tuple[BaseException, str]] = [
    (bce.NoCredentialsError(), "access_denied"),
    (
        bce.PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
        "access_denied",
    ),
    (bce.CredentialRetrievalError(provider="sso", error_msg="x"), "access_denied"),
    (bce.ParamValidationError(report="bad"), "bad_request"),
    (ssl.SSLError("bad handshake"), "unavailable"),
    (TimeoutError("timed out"), "unavailable"),
    (ConnectionResetError("reset"), "unavailable"),
    (http.client.IncompleteRead(b"", 10), "unavailable"),
    (OSError("no route"), "unavailable"),
    (RequestTimeout("stalled"), "timeout"),
    (BadResponse("Content-Length -1"), "unavailable"),
    (Aborted("shutting down"), "unavailable"),
]


def _client_error(code: str, status: int) -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED_CLIENT_CODES.items()))
def test_client_error_codes_translate(code: str, expected: str) -> None:
    """Each S3 error code maps to its documented wire code."""
    status = int(code) if code.isdigit() else 400
    assert expected == translate_error(_client_error(code, status), "b", "k").code  # type: ignore[union-attr]


def test_client_error_table_is_complete() -> None:
    """The module's mapping and this test's contract list the same codes, to the same classes."""
    actual = {code: cls.code for code, cls in CLIENT_ERROR_CODES.items()}
    assert EXPECTED_CLIENT_CODES == actual


@pytest.mark.parametrize(("exc", "expected"), EXPECTED_EXCEPTIONS, ids=lambda v: type(v).__name__)
def test_boundary_exceptions_translate(exc: BaseException, expected: str) -> None:
    """Each credential, socket and HTTP failure type maps to its documented wire code."""
    assert expected == translate_error(exc, "b", "k").code  # type: ignore[union-attr]


def test_exception_table_is_complete() -> None:
    """Every mapped exception type is covered by the contract list above."""
    covered = {
        next(etype for etype, _ in EXCEPTION_TYPES if isinstance(exc, etype))
        for exc, _ in EXPECTED_EXCEPTIONS
    }
    assert {etype for etype, _ in EXCEPTION_TYPES} == covered


def test_s3_error_responses_translate_like_client_errors() -> None:
    """An error parsed off the wire maps exactly as botocore's ClientError would."""
    for code, expected in EXPECTED_CLIENT_CODES.items():
        status = int(code) if code.isdigit() else 400
        assert expected == translate_error(S3ErrorResponse(status, code), "b", "k").code  # type: ignore[union-attr]


def test_precondition_failed_means_object_changed() -> None:
    """A 412 is not an error for the caller: the fetcher starts again from HEAD."""
    assert isinstance(
        translate_error(_client_error("PreconditionFailed", 412), "b", "k"), ObjectChanged
    )


def test_unknown_5xx_is_unavailable_and_unknown_4xx_internal() -> None:
    """Codes outside the table fall back by status class."""
    assert "unavailable" == translate_error(_client_error("Weird", 507), "b", "k").code  # type: ignore[union-attr]
    assert "internal" == translate_error(_client_error("Weird", 418), "b", "k").code  # type: ignore[union-attr]


def test_messages_carry_no_request_details() -> None:
    """Messages are deterministic: no request ids or server text, same cause same words."""
    a = translate_error(_client_error("NoSuchKey", 404), "b", "k")
    b = translate_error(_client_error("NoSuchKey", 404), "b", "k")
    assert str(a) == str(b)
    assert "m" not in str(a).split()


# --- against a real moto server over HTTP, behind the fault proxy ----------------


@pytest.fixture
def s3(moto_server: str) -> Any:
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}),
    )
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    st = Store(tmp_path / "cache")
    yield st
    st.close()


def _fetcher(proxy: FaultProxy, **overrides: Any) -> S3Fetcher:
    cfg = S3Config(
        endpoint_url=proxy.url,
        region="us-east-1",
        addressing_style="path",
        connect_timeout_s=2,
        read_timeout_s=overrides.pop("read_timeout_s", 5),
        max_attempts=overrides.pop("max_attempts", 4),
        **overrides,
    )
    return S3Fetcher(
        cfg, retry=RetryPolicy(max_attempts=cfg.max_attempts, base_delay_s=0.01, max_delay_s=0.05)
    )


def _fetch(
    fetcher: S3Fetcher, store: Store, key: str, max_bytes: int = 1 << 30, timeout: float = 20
) -> str:
    with store.staged() as staged:
        got = fetcher.fetch(
            BUCKET, key, None, staged, max_bytes=max_bytes, deadline=time.monotonic() + timeout
        )
        assert got.size == staged.path.stat().st_size
        return got.sha256


def _put(s3: Any, key: str, data: bytes) -> str:
    s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    return hashlib.sha256(data).hexdigest()


def test_fetch_success_is_one_get(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """An object no bigger than one part: one GET, no HEAD, MD5 and SHA-256 checked."""
    want = _put(s3, "ok.csv", os.urandom(300_000))
    assert want == _fetch(_fetcher(fault_proxy), store, "ok.csv")
    assert {"GET": 1} == dict(fault_proxy.counts)


def test_fetch_large_object_in_parts(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """An object of several parts is fetched as ranged GETs and hashes as hashlib does."""
    want = _put(s3, "big.bin", os.urandom(9 << 20 | 12345))
    fetcher = _fetcher(fault_proxy, part_size=1 << 20, max_concurrency=4)
    fetcher.fast_link_connections = 4  # every connection, however fast the first response
    assert want == _fetch(fetcher, store, "big.bin")
    assert {"GET": 1 + 8} == dict(fault_proxy.counts)  # the first, then two parts a connection


def test_empty_object(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """An empty object (no byte 0 to range over) is fetched and hashes as empty."""
    assert _put(s3, "empty", b"") == _fetch(_fetcher(fault_proxy), store, "empty")


def test_not_found_is_final(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A missing key is not_found after one GET."""
    with pytest.raises(errors.NotFound) as info:
        _fetch(_fetcher(fault_proxy), store, "missing.csv")
    assert "object s3://assetd-tests/missing.csv does not exist" == info.value.message
    assert {"GET": 1} == dict(fault_proxy.counts)


def test_access_denied_on_get_is_never_retried(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A 403 on GET is access_denied after exactly one GET."""
    _put(s3, "secret2.csv", b"x")
    fault_proxy.add(method="GET", status=403, code="AccessDenied")
    with pytest.raises(errors.AccessDenied):
        _fetch(_fetcher(fault_proxy), store, "secret2.csv")
    assert 1 == fault_proxy.counts["GET"]


def test_stall_ends_in_timeout_at_read_timeout(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A GET whose answer stalls past read_timeout_s ends with timeout then, not at the deadline."""
    _put(s3, "stall.csv", os.urandom(10_000))
    fault_proxy.add(method="GET", stall=3.0, times=1)
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        _fetch(_fetcher(fault_proxy, read_timeout_s=0.5), store, "stall.csv")
    assert time.monotonic() - started < 2.0


def test_slowdown_burst_then_success(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """503 SlowDown twice on GET, then the fetch succeeds."""
    want = _put(s3, "busy.csv", os.urandom(10_000))
    fault_proxy.add(method="GET", status=503, code="SlowDown", times=2)
    assert want == _fetch(_fetcher(fault_proxy), store, "busy.csv")
    assert {"GET": 3} == dict(fault_proxy.counts)


def test_retries_exhausted_is_unavailable(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """When every GET answers 503, the fetch ends unavailable after max_attempts GETs."""
    _put(s3, "down.csv", b"abc")
    fault_proxy.add(method="GET", status=503, code="ServiceUnavailable")
    with pytest.raises(errors.Unavailable) as info:
        _fetch(_fetcher(fault_proxy, max_attempts=3), store, "down.csv")
    assert "S3 kept failing after 3 attempts" == info.value.message
    assert 3 == fault_proxy.counts["GET"]


def test_truncated_body_resumes_where_it_stopped(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A body cut short mid-stream is resumed with a range from the first missing byte."""
    want = _put(s3, "cut.bin", os.urandom(200_000))
    fault_proxy.add(method="GET", truncate=1000, times=1)
    assert want == _fetch(_fetcher(fault_proxy), store, "cut.bin")
    assert 2 == fault_proxy.counts["GET"]


def test_parts_failing_mid_body_are_byte_exact(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """Several parts cut mid-body are each resumed; the result is the object, byte for byte."""
    data = os.urandom(6 << 20)
    want = _put(s3, "cuts.bin", data)
    fault_proxy.add(method="GET", truncate=300_000, times=4)
    fetcher = _fetcher(fault_proxy, part_size=1 << 20, max_concurrency=3)
    assert want == _fetch(fetcher, store, "cuts.bin")
    assert 6 + 4 == fault_proxy.counts["GET"]


def test_oversize_object_refused_after_one_get(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """The first GET's Content-Range over the limit refuses the object: no other request."""
    _put(s3, "huge.bin", os.urandom(3 << 20))
    with pytest.raises(errors.TooLarge):
        _fetch(_fetcher(fault_proxy, part_size=1 << 20), store, "huge.bin", max_bytes=(3 << 20) - 1)
    assert {"GET": 1} == dict(fault_proxy.counts)


@pytest.mark.parametrize(
    "header",
    [
        ("Content-Length", "-1"),
        ("Content-Length", "abc"),
        ("Content-Range", "bytes 5-9/5000"),
        ("Content-Range", "bytes 0-99/100"),
        ("Content-Length", "5\u00b2"),  # str.isdigit() is true for a superscript two
    ],
    ids=["negative-length", "non-numeric-length", "other-range", "short-range", "superscript"],
)
def test_nonsense_headers_are_unavailable(
    s3: Any, fault_proxy: FaultProxy, store: Store, header: tuple[str, str]
) -> None:
    """Nonsense framing headers on every answer end in a retryable unavailable, never internal."""
    _put(s3, "liar.bin", os.urandom(5000))
    fault_proxy.add(method="GET", header=header)
    fetcher = _fetcher(fault_proxy, max_attempts=2)
    with pytest.raises(errors.Unavailable) as info:
        _fetch(fetcher, store, "liar.bin")
    assert (True, True) == (info.value.retryable, "BadResponse" in (info.value.detail or ""))
    assert 2 == fault_proxy.counts["GET"]
    assert [] == list(store.tmp.iterdir())
    assert set() == fetcher._pool._busy  # every connection of a refused answer was closed


def test_object_replaced_between_parts_is_byte_exact(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """An object replaced after the first part (412 on the next) yields the new bytes whole."""
    old = os.urandom(3 << 20)
    new = os.urandom(3 << 20)
    _put(s3, "moving.csv", old)
    fault_proxy.add(method="GET", times=1, path="moving", before=lambda: None)
    fault_proxy.add(method="GET", times=1, before=lambda: _put(s3, "moving.csv", new))
    fetcher = _fetcher(fault_proxy, part_size=1 << 20, max_concurrency=1)
    assert hashlib.sha256(new).hexdigest() == _fetch(fetcher, store, "moving.csv")


def test_versioned_fetch_is_pinned(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A version_id fetches exactly that version even after the key is overwritten."""
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    try:
        first = os.urandom(1000)
        vid = s3.put_object(Bucket=BUCKET, Key="v.csv", Body=first)["VersionId"]
        s3.put_object(Bucket=BUCKET, Key="v.csv", Body=b"second")
        fetcher = _fetcher(fault_proxy)
        with store.staged() as staged:
            got = fetcher.fetch(
                BUCKET, "v.csv", vid, staged, max_bytes=1 << 20, deadline=time.monotonic() + 10
            )
        assert (hashlib.sha256(first).hexdigest(), vid) == (got.sha256, got.meta.version_id)
        with pytest.raises(errors.NotFound):
            fetcher.head(BUCKET, "v.csv", "no-such-version", deadline=time.monotonic() + 10)
    finally:
        s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Suspended"})


def test_deadline_passed_is_timeout(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A deadline shorter than the retries needs ends in timeout, not unavailable."""
    _put(s3, "slow.csv", b"abc")
    fault_proxy.add(method="GET", status=503, code="SlowDown")
    fetcher = S3Fetcher(
        S3Config(endpoint_url=fault_proxy.url, region="us-east-1", addressing_style="path"),
        retry=RetryPolicy(max_attempts=50, base_delay_s=0.2, max_delay_s=0.2),
    )
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        _fetch(fetcher, store, "slow.csv", timeout=0.5)
    assert time.monotonic() - started < 2.0


def test_revalidate_unchanged_is_one_304(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A conditional GET of an unchanged object: one request, answered 304."""
    _put(s3, "same.csv", b"same")
    etag = s3.head_object(Bucket=BUCKET, Key="same.csv")["ETag"]
    fault_proxy.reset()
    got = _fetcher(fault_proxy).revalidate(BUCKET, "same.csv", etag, deadline=time.monotonic() + 5)
    assert (None, {"GET": 1}) == (got, dict(fault_proxy.counts))


def test_revalidate_changed_reuses_the_answer(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A changed object: the revalidating GET is the new fetch's first part (one request)."""
    _put(s3, "chg.csv", b"old")
    etag = s3.head_object(Bucket=BUCKET, Key="chg.csv")["ETag"]
    want = _put(s3, "chg.csv", b"new content")
    fault_proxy.reset()
    fetcher = _fetcher(fault_proxy)
    deadline = time.monotonic() + 5
    first = fetcher.revalidate(BUCKET, "chg.csv", etag, deadline=deadline)
    assert first is not None
    with store.staged() as staged:
        got = fetcher.fetch(
            BUCKET, "chg.csv", None, staged, max_bytes=1 << 20, deadline=deadline, first=first
        )
    assert (want, {"GET": 1}) == (got.sha256, dict(fault_proxy.counts))


def test_slow_reservation_before_the_body_is_no_stall(
    s3: Any, fault_proxy: FaultProxy, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time we spend before reading the first part's body (reserving room) is not a server stall."""
    want = _put(s3, "slowroom.csv", os.urandom(1 << 20))
    # as if the headers' recv brought little body: the stall window sees less than the minimum
    monkeypatch.setattr(transport, "MIN_PROGRESS", 1 << 30)
    fetcher = _fetcher(fault_proxy, read_timeout_s=1.0, max_attempts=1)
    with store.staged() as staged:
        got = fetcher.fetch(
            BUCKET, "slowroom.csv", None, staged, max_bytes=2 << 20,
            deadline=time.monotonic() + 20, on_meta=lambda meta: time.sleep(1.5),
        )  # fmt: skip
    assert (want, {"GET": 1}) == (got.sha256, dict(fault_proxy.counts))


# --- the transport: idle connections, trickles, proxies -------------------------------


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_server_closed_idle_connection_is_not_reused(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A kept-alive connection the server closed while idle is replaced: no failed request."""
    want = _put(s3, "idle.csv", os.urandom(5000))
    fault_proxy.idle_close = 0.3
    fetcher = _fetcher(fault_proxy, max_attempts=1)
    assert want == _fetch(fetcher, store, "idle.csv")
    assert _wait_for(lambda: 1 == fault_proxy.idle_closed)
    assert want == _fetch(fetcher, store, "idle.csv")
    assert ({"GET": 2}, 2, 0) == (
        dict(fault_proxy.counts),
        fault_proxy.connections,
        fetcher._pool.stale_retries,
    )


def test_connection_idle_past_the_bound_is_not_reused(
    s3: Any, fault_proxy: FaultProxy, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pooled connection idle longer than IDLE_MAX_S is dropped even if the server kept it."""
    want = _put(s3, "old.csv", os.urandom(5000))
    fault_proxy.idle_close = 60.0
    monkeypatch.setattr(transport, "IDLE_MAX_S", 0.2)
    fetcher = _fetcher(fault_proxy)
    assert want == _fetch(fetcher, store, "old.csv")
    assert want == _fetch(fetcher, store, "old.csv")
    assert 1 == fault_proxy.connections  # reused while fresh
    time.sleep(0.4)
    assert want == _fetch(fetcher, store, "old.csv")
    assert 2 == fault_proxy.connections


def test_stale_reused_connection_is_retried_at_once(
    s3: Any, fault_proxy: FaultProxy, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reused connection that fails before any byte is retried at once, spending no attempt."""
    want = _put(s3, "race.csv", os.urandom(5000))
    fault_proxy.idle_close = 0.2
    fetcher = _fetcher(fault_proxy, max_attempts=1)
    assert want == _fetch(fetcher, store, "race.csv")
    assert _wait_for(lambda: 1 == fault_proxy.idle_closed)
    # the server's close races our reuse: the pool's check cannot see it
    monkeypatch.setattr(transport.Connection, "usable", lambda self, now: True)
    assert want == _fetch(fetcher, store, "race.csv")
    assert (2, 1) == (fault_proxy.connections, fetcher._pool.stale_retries)


@pytest.mark.parametrize("rule", ["trickle_headers", "trickle_body"])
def test_trickle_ends_at_read_timeout_and_closes(
    s3: Any, fault_proxy: FaultProxy, store: Store, rule: str
) -> None:
    """Headers or body sent a byte at a time: timeout at read_timeout_s, connection closed."""
    _put(s3, "drip.csv", os.urandom(2000))
    fault_proxy.add(method="GET", trickle_max_s=20.0, **{rule: 0.1})
    fetcher = _fetcher(fault_proxy, read_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        _fetch(fetcher, store, "drip.csv", timeout=30)
    assert time.monotonic() - started < 2.5
    assert _wait_for(lambda: bool(fault_proxy.trickle_ended), 3.0)
    assert fault_proxy.trickle_ended[0] < 3.0  # the proxy saw us hang up


def test_trickle_ends_at_the_deadline_before_read_timeout(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """With a deadline shorter than read_timeout_s, a trickling body ends at the deadline."""
    _put(s3, "drip2.csv", os.urandom(2000))
    fault_proxy.add(method="GET", trickle_body=0.1, trickle_max_s=20.0)
    fetcher = _fetcher(fault_proxy, read_timeout_s=30)
    started = time.monotonic()
    with pytest.raises(errors.Timeout):
        _fetch(fetcher, store, "drip2.csv", timeout=1.0)
    assert time.monotonic() - started < 2.0


def test_abort_ends_a_hung_get_promptly(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """abort() (daemon shutdown) ends a GET hung on a silent server within a second."""
    _put(s3, "hung.csv", os.urandom(2000))
    fault_proxy.add(method="GET", trickle_headers=1.0, trickle_max_s=20.0)
    fetcher = _fetcher(fault_proxy, read_timeout_s=30)
    threading.Timer(0.5, fetcher.abort).start()
    started = time.monotonic()
    with pytest.raises(errors.Unavailable):
        _fetch(fetcher, store, "hung.csv", timeout=30)
    assert time.monotonic() - started < 2.0


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    socks = [a, b]
    try:
        while True:
            ready, _, _ = select.select(socks, [], [], 10)
            if not ready:
                return
            for s in ready:
                data = s.recv(1 << 16)
                if not data:
                    return
                (b if s is a else a).sendall(data)
    except OSError:
        return
    finally:
        b.close()


@pytest.fixture
def forward_proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as p:
        yield p


def test_http_proxy_from_env_is_used(
    s3: Any,
    fault_proxy: FaultProxy,
    store: Store,
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTP_PROXY (the endpoint is http://) carries the GET, as botocore would send it."""
    want = _put(s3, "viaproxy.csv", os.urandom(3000))
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert want == _fetch(_fetcher(fault_proxy), store, "viaproxy.csv")
    assert 1 == len(forward_proxy.requests)
    assert ("GET", True) == (
        forward_proxy.requests[0].method,
        forward_proxy.requests[0].target.startswith(f"{fault_proxy.url}/"),
    )


def test_no_proxy_is_honoured(
    s3: Any,
    fault_proxy: FaultProxy,
    store: Store,
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY naming the endpoint's host sends the GET straight to it."""
    want = _put(s3, "direct.csv", os.urandom(3000))
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert want == _fetch(_fetcher(fault_proxy), store, "direct.csv")
    assert ([], {"GET": 1}) == (forward_proxy.requests, dict(fault_proxy.counts))


def test_reload_builds_a_new_fetcher_only_for_transport_keys(fault_proxy: FaultProxy) -> None:
    """A changed endpoint gives a new fetcher sharing counters and stop flag; a limit does not."""
    old = _fetcher(fault_proxy)
    same = old.reconfigured(dataclasses.replace(old.config, max_object_bytes=5))
    new = old.reconfigured(dataclasses.replace(old.config, endpoint_url="http://127.0.0.1:9"))
    assert same is old
    assert isinstance(new, S3Fetcher)
    assert ("http://127.0.0.1:9", True, True) == (
        new.config.endpoint_url,
        new.requests is old.requests,
        new.stopping is old.stopping,
    )


class TLSFront:
    """TLS on 127.0.0.1 with a fresh self-signed certificate, relayed in clear to a port."""

    def __init__(self, tmp: Path, upstream_port: int) -> None:
        self.cert, key = self_signed(tmp)
        self.ctx = server_context(self.cert, key)
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        _relay(tls, upstream)
        tls.close()

    def stop(self) -> None:
        self.listener.close()


@pytest.fixture
def tls_front(tmp_path: Path, fault_proxy: FaultProxy) -> Iterator[TLSFront]:
    front = TLSFront(tmp_path, int(fault_proxy.url.rsplit(":", 1)[1]))
    yield front
    front.stop()


def _tls_fetcher(front: TLSFront) -> S3Fetcher:
    cfg = S3Config(
        endpoint_url=f"https://127.0.0.1:{front.port}",
        region="us-east-1",
        addressing_style="path",
        max_attempts=1,
    )
    return S3Fetcher(cfg, retry=RetryPolicy(max_attempts=1))


def test_https_proxy_from_env_tunnels_and_ca_bundle_verifies(
    s3: Any,
    store: Store,
    tls_front: TLSFront,
    forward_proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HTTPS_PROXY carries an https endpoint as a CONNECT tunnel; AWS_CA_BUNDLE verifies it."""
    want = _put(s3, "tls.csv", os.urandom(3000))
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tls_front.cert))
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert want == _fetch(_tls_fetcher(tls_front), store, "tls.csv")
    assert [("CONNECT", f"127.0.0.1:{tls_front.port}")] == [
        (r.method, r.target) for r in forward_proxy.requests
    ]


def test_https_endpoint_needs_the_ca_bundle(
    s3: Any, store: Store, tls_front: TLSFront, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AWS_CA_BUNDLE the self-signed endpoint is refused (unavailable); with it, fetched."""
    want = _put(s3, "tls2.csv", os.urandom(3000))
    for var in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(errors.Unavailable):
        _fetch(_tls_fetcher(tls_front), store, "tls2.csv")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tls_front.cert))
    assert want == _fetch(_tls_fetcher(tls_front), store, "tls2.csv")


def test_refused_connection_is_retried_then_unavailable(store: Store) -> None:
    """Nothing listening at the endpoint: each attempt is refused, then unavailable (retryable)."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # closed again when the block ends
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", max_attempts=3)
    fetcher = S3Fetcher(cfg, retry=RetryPolicy(max_attempts=3, base_delay_s=0.01))
    with pytest.raises(errors.Unavailable) as info:
        _fetch(fetcher, store, "any.csv")
    assert ("S3 kept failing after 3 attempts", 3) == (info.value.message, fetcher.requests["get"])


def test_reload_sends_new_downloads_to_the_new_endpoint(
    s3: Any, moto_server: str, tmp_path: Path
) -> None:
    """AssetService.reconfigure with a new endpoint_url: the next miss goes to the new one."""
    from assetd.config import load_config
    from assetd.service import AssetService

    _put(s3, "a.csv", b"first\n")
    _put(s3, "b.csv", b"second\n")
    port = int(moto_server.rsplit(":", 1)[1])
    old_proxy, new_proxy = FaultProxy(port).start(), FaultProxy(port).start()
    try:
        cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "cache")})
        s3cfg = S3Config(endpoint_url=old_proxy.url, region="us-east-1", addressing_style="path")
        cfg = dataclasses.replace(cfg, s3=s3cfg)
        st = Store(cfg.cache.dir)
        service = AssetService(cfg, S3Fetcher(cfg.s3), st)
        try:
            service.resolve(f"s3://{BUCKET}/a.csv")
            moved = dataclasses.replace(s3cfg, endpoint_url=new_proxy.url)
            service.reconfigure(dataclasses.replace(cfg, s3=moved))
            service.resolve(f"s3://{BUCKET}/b.csv")
        finally:
            service.close()
            st.close()
        assert ({"GET": 1}, {"GET": 1}) == (dict(old_proxy.counts), dict(new_proxy.counts))
        assert 2 == service.fetcher.requests["get"]  # counters carry over the reload
    finally:
        old_proxy.stop()
        new_proxy.stop()
