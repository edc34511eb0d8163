"""Unit tests for assetd.fetcher.base: metadata helpers, retries, parts, verification."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import base64
import hashlib
import itertools
import math
import random
import threading
import time
import zlib
from typing import Any

import pytest

from assetd import errors
from assetd.fetcher.base import (
    CHUNK,
    FAST_LINK_CONNECTIONS,
    MAX_PART,
    ObjectMeta,
    PartResponse,
    RetryPolicy,
)
from assetd.fetcher.memory import MemoryFetcher

MD5_HEX = "9b2cf535f27731c974343645a3985328"
FAR = 3600.0  # deadline offset for calls that must not time out
MULTIPART_ETAG = '"0123456789abcdef0123456789abcdef-2"'


def _deadline() -> float:
    return time.monotonic() + FAR


def _blob(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)  # noqa: S311 - test data, not secrets


class ListSink:
    """A BlobSink in memory: writes at offsets, counts resets, remembers the peak lead."""

    def __init__(self, read_delay: float = 0.0) -> None:
        self.read_delay = read_delay  # a slow hasher, so downloads could run ahead
        self.buf = bytearray()
        self.resets = 0
        self.lock = threading.Lock()
        self.written = 0
        self.read_upto = 0
        self.max_lead = 0  # largest distance of any write past what was read back

    def reset(self) -> None:
        self.buf.clear()
        self.resets += 1

    def allocate(self, size: int) -> None:
        self.buf = bytearray(size)

    def pwrite(self, data: memoryview, offset: int) -> None:
        with self.lock:
            self.buf[offset : offset + len(data)] = data
            self.max_lead = max(self.max_lead, offset + len(data) - self.read_upto)

    def pread(self, buf: memoryview, offset: int) -> int:
        time.sleep(self.read_delay)
        with self.lock:
            chunk = self.buf[offset : offset + len(buf)]
            buf[: len(chunk)] = chunk
            self.read_upto = max(self.read_upto, offset + len(chunk))
            return len(chunk)


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
    ("values", "checksum_type", "full", "composite"),
    [
        ({"sha256": _SHA_B64}, None, [("sha256", _SHA_B64)], []),
        ({"sha256": _SHA_B64}, "FULL_OBJECT", [("sha256", _SHA_B64)], []),
        ({"crc64nvme": "AAAAAAAAAAA="}, None, [("crc64nvme", "AAAAAAAAAAA=")], []),
        ({"sha256": _SHA_B64}, "COMPOSITE", [], [("sha256", _SHA_B64)]),
        ({"crc32": "AAAAAA==-2"}, None, [], [("crc32", "AAAAAA==-2")]),
        ({"crc32c": "AAAAAA==-2"}, "FULL_OBJECT", [], [("crc32c", "AAAAAA==-2")]),
        ({"sha1": "not base64!!"}, None, [], []),
        ({"sha256": "", "crc32": None}, None, [], []),
    ],
)
def test_split_checksums(
    values: dict[str, str | None], checksum_type: str | None, full: list[Any], composite: list[Any]
) -> None:
    """Full-object checksums are kept apart from composite (-N or COMPOSITE) ones."""
    assert (tuple(full), tuple(composite)) == ObjectMeta.split_checksums(values, checksum_type)


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


# --- Fetcher.fetch --------------------------------------------------------------------


def _fetch(f: MemoryFetcher, key: str = "k", **kw: Any) -> tuple[ListSink, Any]:
    sink = ListSink()
    kw.setdefault("max_bytes", 1 << 30)
    kw.setdefault("deadline", _deadline())
    return sink, f.fetch("bucket", key, None, sink, **kw)


@pytest.mark.parametrize("n", [0, 10, CHUNK + 3])
def test_fetch_small_object_is_one_get(n: int) -> None:
    """An object no bigger than one part: its bytes, size and sha256, in one GET."""
    f = MemoryFetcher()
    data = _blob(n)
    obj = f.put("bucket", "k", data)
    sink, fetched = _fetch(f)
    assert data == bytes(sink.buf)
    assert (n, hashlib.sha256(data).hexdigest()) == (fetched.size, fetched.sha256)
    assert obj.etag == fetched.meta.etag
    assert {"get": 1} == dict(f.requests)


@pytest.mark.parametrize(
    ("n", "part", "conc"),
    [(3 << 20, 1 << 20, 2), ((5 << 20) + 17, 1 << 20, 4), ((9 << 20) + 1, 2 << 20, 3)],
)
def test_fetch_in_parts_is_byte_exact(n: int, part: int, conc: int) -> None:
    """An object of several parts lands whole, hashed in order, with one GET per part."""
    f = MemoryFetcher(part_size=part, max_concurrency=conc)
    data = _blob(n)
    f.put("bucket", "big", data)
    sink, fetched = _fetch(f, "big")
    assert data == bytes(sink.buf)
    assert hashlib.sha256(data).hexdigest() == fetched.sha256
    assert f.requests["get"] > 1


def test_plan_has_at_least_as_many_parts_as_connections() -> None:
    """The rest of an object is split so every connection gets a part (never under 1 MiB)."""
    f = MemoryFetcher(part_size=8 << 20, max_concurrency=10)
    parts = f._plan(24 << 20, 8 << 20)
    assert 1 + 10 == len(parts)
    assert (0, 24 << 20) == (parts[0].start, parts[-1].end)
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    assert 2 == len(f._plan((8 << 20) + 1000, 8 << 20))  # 1000 bytes left: one small part


def test_downloads_stay_a_bounded_distance_ahead_of_the_hasher() -> None:
    """With a slow hasher, no part is written further than the bound past the hashed offset."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=2)
    f.max_part = 1 << 20  # many parts, as in an object far over 2 x concurrency x MAX_PART
    data = _blob(24 << 20)
    f.put("bucket", "big", data)
    sink = ListSink(read_delay=0.005)
    f.fetch("bucket", "big", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert data == bytes(sink.buf)
    assert sink.max_lead <= (2 * 2 * 1 + 1) << 20  # 2 x concurrency x part size, + a part


def test_fast_first_response_gets_few_connections() -> None:
    """When the first response alone is fast, the rest runs on two connections, not ten."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=10, rate_bps=2e9)
    f.probe_window_s = 1.0  # 1 MiB within a second is fast, however loaded the machine
    data = _blob(24 << 20)
    f.put("bucket", "big", data)
    sink, _ = _fetch(f, "big")
    assert data == bytes(sink.buf)
    assert FAST_LINK_CONNECTIONS == f.peak_open_responses


def test_capped_first_response_gets_every_connection() -> None:
    """When the first response is slow (a capped connection), the rest uses max_concurrency."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=4, rate_bps=100e6)
    data = _blob(8 << 20)
    f.put("bucket", "big", data)
    sink, _ = _fetch(f, "big")
    assert data == bytes(sink.buf)
    assert 4 == f.peak_open_responses


def test_plan_follows_the_connections_chosen() -> None:
    """Two connections split a large object's rest in four parts; ten in twenty."""
    f = MemoryFetcher(part_size=4 << 20, max_concurrency=10)
    assert (4, 20) == (
        len(f._plan(256 << 20, 4 << 20, 2)) - 1,
        len(f._plan(256 << 20, 4 << 20, 10)) - 1,
    )


def test_plan_of_a_large_object_has_two_parts_a_connection() -> None:
    """A large object's rest is split in about two parts a connection, at most MAX_PART each."""
    f = MemoryFetcher(part_size=4 << 20, max_concurrency=10)
    sizes = {p.end - p.start for p in f._plan(256 << 20, 4 << 20)[1:]}
    assert 20 == len(f._plan(256 << 20, 4 << 20)) - 1
    assert max(sizes) <= math.ceil((252 << 20) / 20)
    huge = f._plan(8 << 30, 4 << 20)[1:]
    assert (128, True) == (len(huge), max(p.end - p.start for p in huge) <= MAX_PART)


class FailingParts(MemoryFetcher):
    """The first ``fail`` part GETs after the first end after ``cut`` bytes."""

    def __init__(self, fail: int, cut: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail = fail
        self.cut = cut

    def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
        part = super()._get(bucket, key, version_id, **kw)
        if kw["start"] > 0 and self.fail > 0:
            self.fail -= 1
            part._view = part._view[: self.cut]  # type: ignore[attr-defined]
        return part


def test_parts_cut_mid_body_resume_byte_exact() -> None:
    """Parts cut short are resumed from their first missing byte; the result is exact."""
    f = FailingParts(fail=3, cut=1000, part_size=1 << 20, max_concurrency=3)
    data = _blob(5 << 20)
    f.put("bucket", "big", data)
    sink, fetched = _fetch(f, "big")
    assert data == bytes(sink.buf)
    assert hashlib.sha256(data).hexdigest() == fetched.sha256
    assert 5 + 3 == f.requests["get"]


def test_part_failing_every_time_is_unavailable() -> None:
    """A part that never completes ends the fetch unavailable after max_attempts."""
    f = FailingParts(fail=1000, cut=0, part_size=1 << 20, max_concurrency=1)
    f.put("bucket", "big", _blob(2 << 20))
    with pytest.raises(errors.Unavailable):
        _fetch(f, "big")


def test_fetch_over_limit_is_too_large_after_one_get() -> None:
    """The first GET's size over max_bytes refuses the object: no second request."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"x" * 101)
    with pytest.raises(errors.TooLarge):
        _fetch(f, max_bytes=100)
    assert {"get": 1} == dict(f.requests)


def test_fetch_size_equal_to_limit_is_allowed() -> None:
    """An object exactly max_bytes long is fetched."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"x" * 100)
    assert 100 == _fetch(f, max_bytes=100)[1].size


def test_on_meta_sees_the_size_before_any_write() -> None:
    """on_meta gets the object's metadata first and may refuse it."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"x" * 100)

    def refuse(meta: ObjectMeta) -> None:
        raise errors.CacheFull(f"no room for {meta.size}")

    with pytest.raises(errors.CacheFull):
        _fetch(f, on_meta=refuse)


def test_fetch_md5_mismatch_is_integrity_error() -> None:
    """Bytes that do not match the MD5 ETag raise IntegrityError after retries."""
    f = MemoryFetcher()
    obj = f.put("bucket", "k", b"original")
    obj.data = b"tampered"
    with pytest.raises(errors.IntegrityError):
        _fetch(f)
    assert f.retry.max_attempts == f.requests["get"]


def test_fetch_sha256_mismatch_is_integrity_error() -> None:
    """With no MD5 ETag, a HEAD beside the GET brings the SHA-256 checksum; a mismatch fails."""
    f = MemoryFetcher()
    obj = f.put("bucket", "k", b"original", checksum=True)
    obj.etag = MULTIPART_ETAG
    obj.data = b"tampered"
    with pytest.raises(errors.IntegrityError):
        _fetch(f)
    assert f.retry.max_attempts == f.requests["head"]


def _crc64nvme_b64(data: bytes) -> str:
    from botocore.httpchecksum import CrtCrc64NvmeChecksum

    c = CrtCrc64NvmeChecksum()
    c.update(data)
    return str(c.b64digest())


@pytest.mark.parametrize(
    ("algorithm", "value"),
    [
        ("crc32", lambda d: base64.b64encode(zlib.crc32(d).to_bytes(4, "big")).decode()),
        ("sha1", lambda d: base64.b64encode(hashlib.sha1(d).digest()).decode()),  # noqa: S324
        ("crc64nvme", _crc64nvme_b64),
    ],
)
@pytest.mark.parametrize("n", [1000, 5 << 20])
def test_crc_only_object_checked_over_the_whole(algorithm: str, value: Any, n: int) -> None:
    """A multipart object with only a CRC/SHA-1: right bytes pass, same-length wrong bytes fail."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=3)
    data = _blob(n)
    obj = f.put("bucket", "k", data)
    obj.etag = MULTIPART_ETAG
    obj.checksums = {algorithm: value(data)}
    assert hashlib.sha256(data).hexdigest() == _fetch(f)[1].sha256
    obj.data = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(errors.IntegrityError):
        _fetch(f)


def test_composite_checksum_is_not_taken_for_full_object() -> None:
    """A -N composite checksum is recorded, never compared with the whole object's."""
    f = MemoryFetcher()
    data = _blob(1000)
    obj = f.put("bucket", "k", data)
    obj.etag = MULTIPART_ETAG
    obj.checksums = {"crc32": "AAAAAA==-2"}
    _, fetched = _fetch(f)
    assert ((), (("crc32", "AAAAAA==-2"),)) == (fetched.meta.checksums, fetched.meta.composite)


def test_fetch_retryable_fault_then_success() -> None:
    """A retryable GET failure is retried and the fetch then succeeds."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    f.faults.get.append(errors.Unavailable("503"))
    sink, fetched = _fetch(f)
    assert (b"data", 4) == (bytes(sink.buf), fetched.size)
    assert {"get": 2} == dict(f.requests)


@pytest.mark.parametrize("exc", [errors.NotFound("gone"), errors.AccessDenied("403")])
def test_fetch_non_retryable_error_not_retried(exc: errors.AssetError) -> None:
    """404/403 from the first GET end the fetch at once."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    f.faults.get.append(exc)
    with pytest.raises(type(exc)):
        _fetch(f)
    assert {"get": 1} == dict(f.requests)


def test_fetch_past_deadline_times_out() -> None:
    """A fetch whose deadline already passed raises Timeout without a request."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    with pytest.raises(errors.Timeout):
        _fetch(f, deadline=time.monotonic())
    assert 0 == sum(f.requests.values())


def test_fetch_retries_stop_at_deadline() -> None:
    """With a long backoff and a short deadline, retrying gives Timeout, not a long sleep."""
    f = MemoryFetcher(RetryPolicy(max_attempts=5, base_delay_s=10.0, max_delay_s=10.0))
    f.put("bucket", "k", b"data")
    f.faults.get.extend(errors.Unavailable("503") for _ in range(5))
    start = time.monotonic()
    with pytest.raises((errors.Timeout, errors.Unavailable)):
        _fetch(f, max_bytes=100, deadline=start + 0.2)
    assert time.monotonic() - start < 1.0


class Replacing(MemoryFetcher):
    """Replaces the object after each of the first ``times`` GETs (a 412 on the next part)."""

    def __init__(self, times: int, **kw: Any) -> None:
        super().__init__(part_size=1 << 20, max_concurrency=1, **kw)
        self.times = times

    def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
        part = super()._get(bucket, key, version_id, **kw)
        if self.times > 0 and kw["start"] == 0:
            self.times -= 1
            self.put(bucket, key, _blob(3 << 20, seed=100 + self.times))
            self.objects[(bucket, key)].etag = f'"{self.times:032x}-2"'  # no MD5 to fall back on
        return part


def test_object_changed_between_parts_restarts_whole() -> None:
    """A 412 on a later part restarts the fetch: the new object, whole, never a mix."""
    f = Replacing(times=1)
    f.put("bucket", "k", _blob(3 << 20, seed=1)).etag = MULTIPART_ETAG
    sink, fetched = _fetch(f)
    new = _blob(3 << 20, seed=100)
    assert new == bytes(sink.buf)
    assert hashlib.sha256(new).hexdigest() == fetched.sha256


def test_object_always_changing_gives_unavailable() -> None:
    """An object replaced after every first GET ends unavailable after max_restarts."""
    f = Replacing(times=1000)
    f.put("bucket", "k", _blob(3 << 20, seed=1))
    with pytest.raises(errors.Unavailable):
        _fetch(f)
    assert f.retry.max_restarts + 1 == 1000 - f.times


def test_revalidate_unchanged_is_none_and_changed_is_first_part() -> None:
    """revalidate: 304 gives None; a changed object's answer is the new fetch's first part."""
    f = MemoryFetcher()
    old = f.put("bucket", "k", b"old")
    assert None is f.revalidate("bucket", "k", old.etag, deadline=_deadline())
    f.put("bucket", "k", b"brand new")
    first = f.revalidate("bucket", "k", old.etag, deadline=_deadline())
    assert first is not None
    sink, _fetched = _fetch(f, first=first)
    assert (b"brand new", {"get": 2}) == (bytes(sink.buf), dict(f.requests))


def test_fetch_version_pins_old_bytes() -> None:
    """fetch with a version_id gets that version's bytes, not the latest."""
    f = MemoryFetcher()
    old = f.put("bucket", "k", b"version one", versioned=True)
    f.put("bucket", "k", b"version two", versioned=True)
    sink = ListSink()
    fetched = f.fetch("bucket", "k", old.version_id, sink, max_bytes=100, deadline=_deadline())
    assert b"version one" == bytes(sink.buf)
    assert old.version_id == fetched.meta.version_id


def test_abort_ends_a_fetch_with_unavailable() -> None:
    """After abort() a fetch fails fast with a clean unavailable."""
    f = MemoryFetcher()
    f.put("bucket", "k", b"data")
    f.abort()
    with pytest.raises(errors.Unavailable):
        _fetch(f)


class FullSink(ListSink):
    """A disk that fills up: every write says ENOSPC, as the store's staged file does."""

    def pwrite(self, data: memoryview, offset: int) -> None:
        raise errors.CacheFull("no room left in the asset cache")


@pytest.mark.parametrize("n", [1000, 3 << 20])
def test_disk_full_while_writing_is_cache_full_not_retried(n: int) -> None:
    """A write failing for lack of room ends the fetch cache_full, never retried as S3's fault."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=2)
    f.put("bucket", "k", _blob(n))
    with pytest.raises(errors.CacheFull):
        f.fetch("bucket", "k", None, FullSink(), max_bytes=1 << 30, deadline=_deadline())
    assert f.requests["get"] <= 3  # the first part, and at most one part per other worker


class OnePartRefused(MemoryFetcher):
    """The part at ``refused`` is denied at once; every other later part drips 4 KiB a read."""

    def __init__(self, refused: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.refused = refused
        self.dripped = 0  # bytes the dripping parts handed out
        self.lock = threading.Lock()

    def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
        if kw["start"] == self.refused:
            raise errors.AccessDenied("access to the object was denied by S3")
        part = super()._get(bucket, key, version_id, **kw)
        if kw["start"] == 0:
            return part
        fetcher, read = self, part.readinto

        def drip(buf: memoryview) -> int:
            time.sleep(0.02)
            n = read(buf[: 4 << 10])
            with fetcher.lock:
                fetcher.dripped += n
            return n

        part.readinto = drip  # type: ignore[method-assign]
        return part


def test_part_failing_for_good_stops_the_other_parts() -> None:
    """Once one part fails for good, parts still downloading stop instead of reading on."""
    f = OnePartRefused(refused=2 << 20, part_size=1 << 20, max_concurrency=3)
    f.put("bucket", "k", _blob(4 << 20)).etag = MULTIPART_ETAG
    with pytest.raises(errors.AccessDenied):
        _fetch(f)
    assert f.dripped < 256 << 10  # a whole part is 1 MiB


class _Link(MemoryFetcher):
    """Responses whose bytes arrive at ``link_bps`` from the moment they open, and wait
    unread in a buffer meanwhile, as they do in a socket's receive buffer."""

    def __init__(self, link_bps: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.link_bps = link_bps

    def _get(self, *args: Any, **kw: Any) -> PartResponse:
        inner = super()._get(*args, **kw)
        link_bps = self.link_bps

        class Arriving:
            meta, start, end, arrived = inner.meta, inner.start, inner.end, inner.arrived
            opened, got = time.monotonic(), 0

            def readinto(self, buf: memoryview) -> int:
                left = self.end - self.start - self.got
                if left <= 0:
                    return 0
                want = min(len(buf), left, 64 << 10)  # block, as recv does, for a chunk
                due = self.opened + (self.got + want) / link_bps
                time.sleep(max(0.0, due - time.monotonic()))
                ready = int((time.monotonic() - self.opened) * link_bps) - self.got
                n = inner.readinto(buf[: max(want, min(ready, len(buf), left))])
                self.got += n
                return n

            def set_deadline(self, deadline: float) -> None:
                return None

            def close(self) -> None:
                inner.close()

        return Arriving()


def test_bytes_buffered_while_making_room_do_not_pass_for_a_fast_link() -> None:
    """A 20 MB/s connection whose first MiB piled up while on_meta made room is still slow."""
    f = _Link(20e6, part_size=1 << 20, max_concurrency=4)
    data = _blob(8 << 20)
    f.put("bucket", "big", data)
    # the store's reservation (its lock, an eviction) takes 100 ms; the body keeps arriving
    sink, _ = _fetch(f, "big", on_meta=lambda meta: time.sleep(0.1))
    assert data == bytes(sink.buf)
    assert 4 == f.peak_open_responses


def test_read_ahead_follows_the_connections_the_probe_chose() -> None:
    """Two connections (a fast first response) bound the read-ahead by two, not max_concurrency."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=10, rate_bps=2e9)
    f.probe_window_s = 1.0
    f.max_part = 1 << 20  # parts of 1 MiB whatever the connections, so only they set the bound
    data = _blob(32 << 20)
    f.put("bucket", "big", data)
    sink = ListSink(read_delay=0.005)
    f.fetch("bucket", "big", None, sink, max_bytes=1 << 30, deadline=_deadline())
    assert data == bytes(sink.buf)
    assert FAST_LINK_CONNECTIONS == f.peak_open_responses
    assert sink.max_lead <= (2 * FAST_LINK_CONNECTIONS * 1 + 1) << 20


def test_a_part_thread_that_cannot_start_is_reported_not_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When no more part threads can start, that error surfaces and the started parts stop."""
    f = MemoryFetcher(part_size=1 << 20, max_concurrency=4, rate_bps=100e6)
    f.put("bucket", "big", _blob(8 << 20))
    started: list[threading.Thread] = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "assetd-part" and len(started) >= 2:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        _fetch(f, "big")
    assert [False, False] == [t.is_alive() for t in started]
