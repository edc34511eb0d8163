"""Unit tests for assetd.fetcher.base: metadata helpers, retries, verified streaming."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import random
import time

import pytest

from assetd import errors
from assetd.fetcher.base import (
    CHUNK,
    PIPELINE_MIN_BYTES,
    ObjectMeta,
    RetryPolicy,
    stream_body,
)
from assetd.fetcher.memory import MemoryFetcher

MD5_HEX = "9b2cf535f27731c974343645a3985328"
FAR = 3600.0  # deadline offset for calls that must not time out


def _deadline() -> float:
    return time.monotonic() + FAR


def _blob(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)  # noqa: S311 - test data, not secrets


class ListSink:
    """A BlobSink that keeps the bytes in memory and counts resets."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.resets = 0

    def write(self, data: memoryview) -> None:
        self.buf += data

    def reset(self) -> None:
        self.buf.clear()
        self.resets += 1


class TrickleBody:
    """A body that hands out at most ``step`` bytes per readinto call."""

    def __init__(self, data: bytes, step: int) -> None:
        self._io = io.BytesIO(data)
        self.step = step
        self.closed = False

    def readinto(self, buf: memoryview) -> int:
        return self._io.readinto(buf[: self.step])

    def close(self) -> None:
        self.closed = True


class LyingFetcher(MemoryFetcher):
    """HEAD announces ``size_delta`` more bytes than the body has (no MD5 to check)."""

    def __init__(self, size_delta: int) -> None:
        super().__init__()
        self.size_delta = size_delta

    def _head(self, bucket: str, key: str, version_id: str | None, deadline: float) -> ObjectMeta:
        meta = super()._head(bucket, key, version_id, deadline)
        return dataclasses.replace(meta, size=meta.size + self.size_delta, md5=None)


# --- ObjectMeta helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("etag", "encrypted", "expected"),
    [
        (f'"{MD5_HEX}"', False, MD5_HEX),
        (MD5_HEX, False, MD5_HEX),
        (f'"{MD5_HEX.upper()}"', False, MD5_HEX),
        (f'"{MD5_HEX}-3"', False, None),
        (f'"{MD5_HEX}-10000"', False, None),
        (f'"{MD5_HEX}"', True, None),
        (f'W/"{MD5_HEX}"', False, None),
        (f'"{MD5_HEX[:-1]}"', False, None),
        (f'"{MD5_HEX}0"', False, None),
        ('"not-hex-at-all-not-hex-at-all-xx"', False, None),
        ("", False, None),
    ],
)
def test_md5_from_etag(etag: str, encrypted: bool, expected: str | None) -> None:
    """Only a plain, unencrypted 32-hex ETag is taken as the body's MD5 (lower-cased)."""
    assert expected == ObjectMeta.md5_from_etag(etag, encrypted=encrypted)


_SHA = hashlib.sha256(b"hello").digest()
_SHA_B64 = base64.b64encode(_SHA).decode()


@pytest.mark.parametrize(
    ("value", "checksum_type", "expected"),
    [
        (_SHA_B64, None, _SHA.hex()),
        (_SHA_B64, "FULL_OBJECT", _SHA.hex()),
        (_SHA_B64, "COMPOSITE", None),
        (_SHA_B64 + "-2", None, None),
        (_SHA_B64 + "-2", "FULL_OBJECT", None),
        ("not base64!!", None, None),
        (_SHA_B64[:-2], None, None),
        (base64.b64encode(b"\x00" * 16).decode(), None, None),
        (base64.b64encode(b"\x00" * 33).decode(), None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_sha256_from_checksum(
    value: str | None, checksum_type: str | None, expected: str | None
) -> None:
    """Only a valid base64 32-byte full-object checksum yields a hex SHA-256."""
    assert expected == ObjectMeta.sha256_from_checksum(value, checksum_type)


# --- RetryPolicy ------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 12))
def test_retry_delay_bounds(attempt: int) -> None:
    """delay() stays within [0, min(max_delay, base * 2**(attempt-1))]."""
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=2.0)
    cap = min(2.0, 0.1 * 2 ** (attempt - 1))
    samples = [policy.delay(attempt) for _ in range(200)]
    assert all(0.0 <= d <= cap for d in samples)
    assert max(samples) > cap / 4  # jitter spreads over the range, not stuck at 0


def test_retry_delay_zero_policy() -> None:
    """A zero base delay never sleeps."""
    assert {0.0} == {RetryPolicy(base_delay_s=0.0, max_delay_s=0.0).delay(n) for n in (1, 5)}


def test_retry_delay_huge_attempt_is_capped() -> None:
    """A very late attempt is still capped at max_delay_s, not an overflow."""
    assert 0.0 <= RetryPolicy(max_attempts=5000).delay(2000) <= 2.0


# --- stream_body directly -----------------------------------------------------------


def _meta(data: bytes, *, size: int | None = None, md5: bool = True) -> ObjectMeta:
    return ObjectMeta(
        bucket="bucket",
        key="k",
        size=len(data) if size is None else size,
        etag='"x"',
        md5=hashlib.md5(data).hexdigest() if md5 else None,  # noqa: S324
    )


@pytest.mark.parametrize(
    "n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, PIPELINE_MIN_BYTES, PIPELINE_MIN_BYTES + 12345]
)
@pytest.mark.parametrize("step", [7919, 1 << 20])
def test_stream_body_copies_and_hashes(n: int, step: int) -> None:
    """stream_body writes every byte and hashes it, inline or pipelined, whatever the reads."""
    data = _blob(n)
    sink = ListSink()
    hasher = stream_body(TrickleBody(data, step), sink, _meta(data), _deadline())
    assert n == hasher.size
    assert data == bytes(sink.buf)
    assert hashlib.sha256(data).hexdigest() == hasher.sha.hexdigest()
    assert hasher.md5 is not None
    assert hashlib.md5(data).hexdigest() == hasher.md5.hexdigest()  # noqa: S324


@pytest.mark.parametrize("n", [1000, PIPELINE_MIN_BYTES + 5])
def test_stream_body_stops_one_byte_past_announced(n: int) -> None:
    """A body longer than announced is read only to size + 1 bytes."""
    data = _blob(n + 10 * CHUNK)
    sink = ListSink()
    hasher = stream_body(TrickleBody(data, 1 << 20), sink, _meta(data, size=n), _deadline())
    assert n + 1 == hasher.size
    assert data[: n + 1] == bytes(sink.buf)


def test_stream_body_past_deadline_times_out() -> None:
    """An expired deadline stops the copy with Timeout."""
    data = _blob(100)
    with pytest.raises(errors.Timeout):
        stream_body(TrickleBody(data, 10), ListSink(), _meta(data), time.monotonic() - 1)


def test_stream_body_pipelined_sink_failure_surfaces() -> None:
    """A sink error on the hashing thread reaches the caller of the pipelined path."""

    class FullSink(ListSink):
        def write(self, data: memoryview) -> None:
            if len(self.buf) >= 2 * CHUNK:
                raise errors.CacheFull("no room left in the asset cache")
            super().write(data)

    data = _blob(PIPELINE_MIN_BYTES + 1)
    with pytest.raises(errors.CacheFull):
        stream_body(TrickleBody(data, 1 << 20), FullSink(), _meta(data), _deadline())


# --- Fetcher.fetch --------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 10, CHUNK + 3])
def test_fetch_small_object(n: int) -> None:
    """fetch of a small object gives its bytes, size, sha256 and the HEAD metadata."""
    f = MemoryFetcher()
    data = _blob(n)
    obj = f.put("bucket", "k", data)
    sink = ListSink()
    fetched = f.fetch("bucket", "k", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert data == bytes(sink.buf)
    assert n == fetched.size
    assert hashlib.sha256(data).hexdigest() == fetched.sha256
    assert obj.etag == fetched.meta.etag
    assert {"head": 1, "get": 1} == dict(f.requests)


def test_fetch_pipelined_object_sha256() -> None:
    """An object over PIPELINE_MIN_BYTES goes through the pipelined path intact."""
    f = MemoryFetcher()
    data = _blob(PIPELINE_MIN_BYTES + 3 * CHUNK + 17)
    f.put("bucket", "big", data, checksum=True)
    sink = ListSink()
    fetched = f.fetch("bucket", "big", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert hashlib.sha256(data).hexdigest() == fetched.sha256
    assert len(data) == fetched.size
    assert data == bytes(sink.buf)


@pytest.mark.parametrize("n", [100, PIPELINE_MIN_BYTES + 100])
def test_fetch_body_longer_than_announced_is_too_large(n: int) -> None:
    """A body longer than HEAD announced raises TooLarge, without retrying."""
    f = LyingFetcher(size_delta=-1)
    f.put("bucket", "k", _blob(n))
    with pytest.raises(errors.TooLarge):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())
    assert 1 == f.requests["get"]


@pytest.mark.parametrize("n", [100, PIPELINE_MIN_BYTES + 100])
def test_fetch_truncated_body_unavailable_after_retries(n: int) -> None:
    """A body shorter than announced is retried max_attempts times, then Unavailable."""
    f = LyingFetcher(size_delta=10)
    f.put("bucket", "k", _blob(n))
    sink = ListSink()
    with pytest.raises(errors.Unavailable):
        f.fetch("bucket", "k", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert f.retry.max_attempts == f.requests["get"]
    assert f.retry.max_attempts == sink.resets


def test_fetch_head_over_limit_is_too_large_without_get() -> None:
    """HEAD size over max_bytes refuses before any GET."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"x" * 101)
    with pytest.raises(errors.TooLarge):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=100, deadline=_deadline())
    assert 0 == f.requests["get"]


def test_fetch_size_equal_to_limit_is_allowed() -> None:
    """An object exactly max_bytes long is fetched."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"x" * 100)
    assert 100 == f.fetch("bucket", "k", None, ListSink(), max_bytes=100, deadline=_deadline()).size


def test_fetch_md5_mismatch_is_integrity_error() -> None:
    """Bytes that do not match the MD5 ETag raise IntegrityError after retries."""
    f = MemoryFetcher()
    obj = f.put("bucket", "k", b"original")
    obj.data = b"tampered"
    with pytest.raises(errors.IntegrityError):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())
    assert f.retry.max_attempts == f.requests["get"]


def test_fetch_sha256_mismatch_is_integrity_error() -> None:
    """Bytes that do not match the SHA-256 checksum raise IntegrityError (no MD5 ETag)."""
    f = MemoryFetcher()
    obj = f.put("bucket", "k", b"original", checksum=True)
    obj.etag = '"0123456789abcdef0123456789abcdef-2"'  # multipart: no MD5 to check
    obj.data = b"tampered"
    with pytest.raises(errors.IntegrityError):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())


def test_fetch_retryable_fault_then_success() -> None:
    """A retryable GET failure is retried and the fetch then succeeds."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    f.faults.get.append(errors.Unavailable("503"))
    f.faults.head.append(errors.Unavailable("503"))
    sink = ListSink()
    fetched = f.fetch("bucket", "k", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert b"data" == bytes(sink.buf)
    assert 4 == fetched.size
    assert {"head": 2, "get": 2} == dict(f.requests)


@pytest.mark.parametrize("exc", [errors.NotFound("gone"), errors.AccessDenied("403")])
def test_fetch_non_retryable_head_error_not_retried(exc: errors.AssetError) -> None:
    """404/403 from HEAD end the fetch at once."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    f.faults.head.append(exc)
    with pytest.raises(type(exc)):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())
    assert {"head": 1} == dict(f.requests)


def test_fetch_missing_object_not_found() -> None:
    """A missing key raises NotFound after a single HEAD."""
    f = MemoryFetcher()
    with pytest.raises(errors.NotFound):
        f.fetch("bucket", "nope", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())
    assert 1 == f.requests["head"]


def test_fetch_past_deadline_times_out() -> None:
    """A fetch whose deadline already passed raises Timeout without a request."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    with pytest.raises(errors.Timeout):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=time.monotonic())
    assert 0 == sum(f.requests.values())


def test_fetch_retries_stop_at_deadline() -> None:
    """With a long backoff and a short deadline, retrying gives Timeout, not a long sleep."""
    f = MemoryFetcher(RetryPolicy(max_attempts=5, base_delay_s=10.0, max_delay_s=10.0))
    f.put("bucket", "k", b"data")
    f.faults.get.extend(errors.Unavailable("503") for _ in range(5))
    start = time.monotonic()
    with pytest.raises((errors.Timeout, errors.Unavailable)):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=100, deadline=start + 0.2)
    assert time.monotonic() - start < 1.0


def test_fetch_object_changed_restarts_from_head() -> None:
    """An object replaced between HEAD and GET is fetched again, whole and new."""

    class Replacing(MemoryFetcher):
        def _head(
            self, bucket: str, key: str, version_id: str | None, deadline: float
        ) -> ObjectMeta:
            meta = super()._head(bucket, key, version_id, deadline)
            if self.requests["head"] == 1:
                self.put(bucket, key, b"new content, longer than before")
            return meta

    f = Replacing()
    f.put("bucket", "k", b"old content")
    sink = ListSink()
    fetched = f.fetch("bucket", "k", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert b"new content, longer than before" == bytes(sink.buf)
    assert hashlib.sha256(b"new content, longer than before").hexdigest() == fetched.sha256
    assert 2 == f.requests["head"]


def test_fetch_object_always_changing_gives_unavailable() -> None:
    """An object replaced after every HEAD ends in Unavailable after max_restarts."""

    class Churning(MemoryFetcher):
        def _head(
            self, bucket: str, key: str, version_id: str | None, deadline: float
        ) -> ObjectMeta:
            meta = super()._head(bucket, key, version_id, deadline)
            self.put(bucket, key, _blob(50, seed=self.requests["head"]))
            return meta

    f = Churning()
    f.put("bucket", "k", b"start")
    with pytest.raises(errors.Unavailable):
        f.fetch("bucket", "k", None, ListSink(), max_bytes=1 << 30, deadline=_deadline())
    assert f.retry.max_restarts + 1 == f.requests["head"]


def test_fetch_with_given_meta_skips_head() -> None:
    """Passing HEAD metadata to fetch skips the first HEAD."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    meta = f.head("bucket", "k", None, deadline=_deadline())
    f.fetch("bucket", "k", None, ListSink(), max_bytes=100, deadline=_deadline(), meta=meta)
    assert {"head": 1, "get": 1} == dict(f.requests)


def test_fetch_version_pins_old_bytes() -> None:
    """fetch with a version_id gets that version's bytes, not the latest."""
    f = MemoryFetcher()
    old = f.put("bucket", "k", b"version one", versioned=True)
    f.put("bucket", "k", b"version two", versioned=True)
    sink = ListSink()
    fetched = f.fetch("bucket", "k", old.version_id, sink, max_bytes=100, deadline=_deadline())
    assert b"version one" == bytes(sink.buf)
    assert old.version_id == fetched.meta.version_id
