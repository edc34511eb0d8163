"""The boto3 fetcher: error translation table, and behaviour against a real moto server."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import ssl
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
from assetd.fetcher.base import ObjectChanged, RetryPolicy
from assetd.fetcher.s3 import (
    CLIENT_ERROR_CODES,
    EXCEPTION_TYPES,
    S3ErrorResponse,
    S3Fetcher,
    translate_error,
)
from assetd.store import Store
from tests.support.faultproxy import FaultProxy

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


def test_fetch_success_verifies_md5_and_sha256(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A plain object is fetched with one HEAD and one GET, hashed correctly."""
    want = _put(s3, "ok.csv", os.urandom(300_000))
    assert want == _fetch(_fetcher(fault_proxy), store, "ok.csv")
    assert {"HEAD": 1, "GET": 1} == dict(fault_proxy.counts)


def test_fetch_large_object_through_the_pipeline(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """An object above the pipelining threshold hashes the same as hashlib does."""
    want = _put(s3, "big.bin", os.urandom(9 << 20))
    assert want == _fetch(_fetcher(fault_proxy), store, "big.bin")


def test_not_found_is_final(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A missing key is not_found after one HEAD and no GET."""
    with pytest.raises(errors.NotFound) as info:
        _fetch(_fetcher(fault_proxy), store, "missing.csv")
    assert "object s3://assetd-tests/missing.csv does not exist" == info.value.message
    assert {"HEAD": 1} == dict(fault_proxy.counts)


def test_access_denied_is_never_retried(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A 403 on HEAD is access_denied at once."""
    _put(s3, "secret.csv", b"x")
    fault_proxy.add(method="HEAD", status=403, code="AccessDenied")
    with pytest.raises(errors.AccessDenied):
        _fetch(_fetcher(fault_proxy), store, "secret.csv")
    assert {"HEAD": 1} == dict(fault_proxy.counts)


def test_access_denied_on_get_is_never_retried(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A 403 on GET is access_denied after exactly one GET."""
    _put(s3, "secret2.csv", b"x")
    fault_proxy.add(method="GET", status=403, code="AccessDenied")
    with pytest.raises(errors.AccessDenied):
        _fetch(_fetcher(fault_proxy), store, "secret2.csv")
    assert 1 == fault_proxy.counts["GET"]


def test_stall_then_retry_succeeds(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A GET that stalls past the read timeout is retried and then succeeds."""
    want = _put(s3, "stall.csv", os.urandom(10_000))
    fault_proxy.add(method="GET", stall=2.0, times=1)
    assert want == _fetch(_fetcher(fault_proxy, read_timeout_s=0.5), store, "stall.csv")
    assert 2 == fault_proxy.counts["GET"]


def test_slowdown_burst_then_success(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """503 SlowDown twice on HEAD and twice on GET, then the fetch succeeds."""
    want = _put(s3, "busy.csv", os.urandom(10_000))
    fault_proxy.add(method="HEAD", status=503, code="SlowDown", times=2)
    fault_proxy.add(method="GET", status=503, code="SlowDown", times=2)
    assert want == _fetch(_fetcher(fault_proxy), store, "busy.csv")
    assert {"HEAD": 3, "GET": 3} == dict(fault_proxy.counts)


def test_retries_exhausted_is_unavailable(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """When every GET answers 503, the fetch ends unavailable after max_attempts GETs."""
    _put(s3, "down.csv", b"abc")
    fault_proxy.add(method="GET", status=503, code="ServiceUnavailable")
    with pytest.raises(errors.Unavailable) as info:
        _fetch(_fetcher(fault_proxy, max_attempts=3), store, "down.csv")
    assert "S3 kept failing after 3 attempts" == info.value.message
    assert 3 == fault_proxy.counts["GET"]


def test_truncated_body_is_retried(s3: Any, fault_proxy: FaultProxy, store: Store) -> None:
    """A body cut short mid-stream is a transient failure: fetched again whole."""
    want = _put(s3, "cut.bin", os.urandom(200_000))
    fault_proxy.add(method="GET", truncate=1000, times=1)
    assert want == _fetch(_fetcher(fault_proxy), store, "cut.bin")
    assert 2 == fault_proxy.counts["GET"]


def test_oversize_object_refused_with_zero_gets(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """HEAD's size over the limit refuses the object before any GET."""
    _put(s3, "huge.bin", os.urandom(5000))
    with pytest.raises(errors.TooLarge):
        _fetch(_fetcher(fault_proxy), store, "huge.bin", max_bytes=4999)
    assert 0 == fault_proxy.counts["GET"]


def test_body_longer_than_head_said_is_too_large(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """A body longer than HEAD announced is cut off and refused as too_large."""
    _put(s3, "liar.bin", os.urandom(5000))
    fault_proxy.add(method="HEAD", header=("Content-Length", "100"))
    with pytest.raises(errors.TooLarge):
        _fetch(_fetcher(fault_proxy), store, "liar.bin", max_bytes=1000)
    assert [] == list(store.tmp.iterdir())


def test_object_replaced_between_head_and_get(
    s3: Any, fault_proxy: FaultProxy, store: Store
) -> None:
    """An object replaced after HEAD yields the new bytes whole, never a mix."""
    old = os.urandom(100_000)
    new = os.urandom(100_000)
    _put(s3, "moving.csv", old)
    fault_proxy.add(method="GET", times=1, before=lambda: _put(s3, "moving.csv", new))
    assert hashlib.sha256(new).hexdigest() == _fetch(_fetcher(fault_proxy), store, "moving.csv")
    assert 2 == fault_proxy.counts["HEAD"]


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
