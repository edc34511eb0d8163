"""What every fetcher shares: object metadata, retries, parallel parts, verification.

A concrete fetcher supplies two primitives: ``_get`` (one GET of a byte
range, optionally conditional) and ``_head``. This module owns everything
that must behave the same whatever the backend:

- a miss starts with one GET of the first part; its headers give the size,
  ETag and version, so ``too_large`` is decided before any other request and
  an object no bigger than one part takes one round trip;
- the rest is fetched as parallel ranged GETs pinned to that ETag
  (``If-Match``) and version, written at their offsets in the staged file;
- one hasher follows the contiguous prefix, reading it back from the page
  cache, so no part is held in memory; downloads run at most a bounded
  distance ahead of it;
- verification: size always, MD5 for plain ETags, and every full-object
  checksum S3 returns (CRC32, CRC32C, CRC64NVME, SHA-1, SHA-256);
- bounded retries under one deadline: a failed part is retried (resuming
  where it stopped), an object replaced mid-fetch (412) restarts it all.

Primitives raise :class:`~assetd.errors.AssetError` (``retryable`` ones are
tried again with backoff), :class:`ObjectChanged` on 412 and
:class:`NotModified` on 304.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from assetd.config import S3Config
from assetd.errors import (
    AssetError,
    CacheFull,
    IntegrityError,
    Timeout,
    TooLarge,
    Unavailable,
)
from assetd.log import get_logger

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "BlobSink",
    "Fetched",
    "Fetcher",
    "NotModified",
    "ObjectChanged",
    "ObjectMeta",
    "PartResponse",
    "RetryPolicy",
]

log = get_logger("assetd.fetcher")

_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
CHUNK = 1 << 20
# A part's bytes are written (and the hasher woken) once a whole buffer has
# arrived: 256 KiB writes cost loopback 256 MiB ~5 % more CPU-bound time.
_FLUSH_AT = CHUNK
# Hashing in the reading thread (an object of one part) flushes sooner, so
# hashing overlaps the arrival and little is left to hash after the last byte.
_INLINE_FLUSH_AT = 128 << 10
MIN_PART = 1 << 20  # parts of the rest of an object are never split below this
# A large object's rest is split into about this many parts per connection:
# bigger parts cost fewer request round trips (measured: WAN 1 GiB 0.96 -> 0.87x
# boto3), two per connection still even out a slow connection's tail.
PARTS_PER_CONNECTION = 2
MAX_PART = 64 << 20  # and no bigger, which bounds the read-ahead (two rounds of parts)
# Parallel connections pay off where each one is capped (real S3: ~50-100 MB/s
# and 10-30 ms to the first byte). Where the first response alone brings its
# first PROBE_BYTES within PROBE_WINDOW_S (>= 262 MB/s), more connections only
# add requests, signing and server work on a shared CPU: such a download gets
# FAST_LINK_CONNECTIONS. Measured on loopback SeaweedFS, 256 MiB: 10 connections
# 0.31 s, 2 connections 0.26 s; the slow-link cost is the window, 4 ms at most.
PROBE_BYTES = 1 << 20
PROBE_WINDOW_S = 0.004
FAST_LINK_CONNECTIONS = 2
# S3's full-object checksum algorithms, by the suffix of their x-amz-checksum-* header.
CHECKSUM_ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")
T = TypeVar("T")
_COUNT_LOCK = threading.Lock()


class ObjectChanged(Exception):
    """The object no longer matches what the first response saw (HTTP 412)."""


class NotModified(Exception):
    """A conditional GET answered 304: the object still has the ETag we hold."""


def _checksum_impl(algorithm: str) -> Any:
    """botocore's implementation of an S3 checksum (CRT-backed where awscrt is installed)."""
    from botocore import httpchecksum as hc

    impls: dict[str, Any] = {
        "crc32": getattr(hc, "CrtCrc32Checksum", None) if hc.HAS_CRT else hc.Crc32Checksum,
        "crc32c": getattr(hc, "CrtCrc32cChecksum", None) if hc.HAS_CRT else None,
        "crc64nvme": getattr(hc, "CrtCrc64NvmeChecksum", None) if hc.HAS_CRT else None,
        "sha1": hc.Sha1Checksum,
        "sha256": hc.Sha256Checksum,
    }
    impl = impls.get(algorithm)
    return None if impl is None else impl()


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What S3 said about an object, reduced to what fetching and verification need."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None
    md5: str | None = None  # hex; set only when the ETag is a plain MD5 of the body
    # full-object checksums S3 returned: (algorithm, base64 value)
    checksums: tuple[tuple[str, str], ...] = ()
    # composite (per-part) checksums: recorded, never taken for full-object ones
    composite: tuple[tuple[str, str], ...] = ()

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 from S3's full-object checksum, when present."""
        for algorithm, value in self.checksums:
            if algorithm == "sha256":
                return base64.b64decode(value).hex()
        return None

    @staticmethod
    def md5_from_etag(etag: str, *, encrypted: bool) -> str | None:
        """The body's MD5 if the ETag is one: not multipart, not KMS or SSE-C."""
        m = _PLAIN_MD5_ETAG.match(etag)
        return m.group(1).lower() if m and not encrypted else None

    @staticmethod
    def split_checksums(
        values: dict[str, str | None], checksum_type: str | None
    ) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        """(full-object, composite) checksums from ``x-amz-checksum-<algorithm>`` values."""
        full: list[tuple[str, str]] = []
        composite: list[tuple[str, str]] = []
        kind = (checksum_type or "").upper()
        for algorithm in CHECKSUM_ALGORITHMS:
            value = (values.get(algorithm) or "").strip()
            if not value:
                continue
            digest, _, parts = value.partition("-")
            if parts or kind == "COMPOSITE":
                composite.append((algorithm, value))  # a checksum of part checksums
                continue
            try:
                base64.b64decode(digest, validate=True)
            except (binascii.Error, ValueError):
                continue
            full.append((algorithm, digest))
        return tuple(full), tuple(composite)


@dataclass(frozen=True, slots=True)
class Fetched:
    meta: ObjectMeta
    sha256: str
    size: int


class BlobSink(Protocol):
    """Where a body goes: the store's staged temp file, written at offsets."""

    def reset(self) -> None: ...

    def allocate(self, size: int) -> None: ...

    def pwrite(self, data: memoryview, offset: int) -> None: ...

    def pread(self, buf: memoryview, offset: int) -> int: ...


class PartResponse(Protocol):
    """One GET's answer: object metadata, and the body for bytes [start, end)."""

    meta: ObjectMeta
    start: int
    end: int
    arrived: float  # time.monotonic() when its headers were read: the probe counts from here

    def readinto(self, buf: memoryview) -> int:
        """At most ``len(buf)`` bytes as they arrive; 0 at the end of the body."""
        ...

    def set_deadline(self, deadline: float) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    max_restarts: int = 3  # restarts after the object changed mid-fetch

    def delay(self, attempt: int) -> float:
        """Full-jitter exponential backoff for the attempt that just failed (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** min(attempt - 1, 30)))
        return random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography


def _check_deadline(deadline: float, what: str) -> None:
    if time.monotonic() >= deadline:
        raise Timeout(f"deadline passed while {what}")


# MD5 runs beside SHA-256 rather than after it: both drop the GIL, and on
# 2 cores this halves the hashing time of a plain-ETag object.
_MD5_POOL = ThreadPoolExecutor(2, thread_name_prefix="assetd-md5")


class _Digests:
    """SHA-256 always, MD5 for plain ETags, S3 checksums once known; fed in order."""

    def __init__(self, meta: ObjectMeta) -> None:
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5() if meta.md5 else None  # noqa: S324 - integrity, not security
        self.checksums: dict[str, Any] = {}
        self.size = 0

    def add_checksums(self, meta: ObjectMeta) -> list[str]:
        """Start the checksums ``meta`` names; returns those that need catching up."""
        new = []
        for algorithm, _value in meta.checksums:
            if algorithm in self.checksums or algorithm == "sha256":
                continue
            impl = _checksum_impl(algorithm)
            if impl is None:
                log.warning("no implementation for S3 checksum; skipped", algorithm=algorithm)
                continue
            self.checksums[algorithm] = impl
            new.append(algorithm)
        return new

    def feed(self, data: memoryview, only: list[str] | None = None) -> None:
        if only is not None:  # catching a late checksum up over bytes already hashed
            for algorithm in only:
                self.checksums[algorithm].update(data)
            return
        md5 = None if self.md5 is None else _MD5_POOL.submit(self.md5.update, data)
        self.sha.update(data)
        for impl in self.checksums.values():
            impl.update(data)
        if md5 is not None:
            md5.result()  # the buffer is reused after this returns
        self.size += len(data)

    def verify(self, meta: ObjectMeta) -> str:
        """The SHA-256 hex digest, after every check ``meta`` allows; else IntegrityError."""
        digest = self.sha.hexdigest()
        if self.md5 is not None and self.md5.hexdigest() != meta.md5:
            raise IntegrityError("downloaded bytes do not match the object's MD5 ETag")
        for algorithm, value in meta.checksums:
            if algorithm == "sha256":
                ok = base64.b64encode(bytes.fromhex(digest)).decode() == value
            elif algorithm in self.checksums:
                ok = self.checksums[algorithm].b64digest() == value
            else:
                continue
            if not ok:
                raise IntegrityError(
                    f"downloaded bytes do not match the object's {algorithm.upper()} checksum"
                )
        return digest


@dataclass
class _Part:
    start: int
    end: int
    done: int = 0  # bytes written from start

    @property
    def complete(self) -> bool:
        return self.start + self.done >= self.end


@dataclass
class _Job:
    """One attempt at a whole object: parts, their progress, the hasher's offset."""

    meta: ObjectMeta
    parts: list[_Part]
    deadline: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    next_part: int = 1
    hashed: int = 0
    error: BaseException | None = None
    planned: bool = False  # the parts after the first are known
    connections: int = 1

    def contiguous(self) -> int:
        """End of the prefix written without gaps (called under ``cond``)."""
        for part in self.parts:
            if not part.complete:
                return part.start + part.done
        return self.meta.size

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            self.cond.notify_all()


class Fetcher(ABC):
    """First GET, parallel ranged GETs pinned to it, verified, with bounded retries."""

    max_part = MAX_PART  # the largest part the plan makes of a large object's rest
    fast_link_connections = FAST_LINK_CONNECTIONS
    probe_window_s = PROBE_WINDOW_S

    def __init__(
        self,
        retry: RetryPolicy | None = None,
        *,
        part_size: int = 4 << 20,
        max_concurrency: int = 16,
        stopping: threading.Event | None = None,
        requests: Counter[str] | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        # "head" / "get" sent to the backend; shared with the fetcher a reload replaces
        self.requests: Counter[str] = Counter() if requests is None else requests
        # set at shutdown: downloads end with a clean error; shared across reloads
        self.stopping = stopping or threading.Event()

    def abort(self) -> None:
        """Make in-flight and future fetches fail fast (daemon shutdown)."""
        self.stopping.set()

    def close(self) -> None:
        """Release idle resources; in-flight fetches finish (a reload replaced us)."""
        return None

    def reconfigured(self, s3: S3Config) -> Fetcher:
        """A fetcher for new ``[s3]`` settings (SIGHUP), or self if nothing it uses changed."""
        return self

    def _count(self, op: str) -> None:
        with _COUNT_LOCK:
            self.requests[op] += 1

    # -- primitives ------------------------------------------------------------------

    @abstractmethod
    def _head(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        deadline: float,
        *,
        if_match: str | None = None,
    ) -> ObjectMeta:
        """One HEAD with checksums; raise an AssetError, or ObjectChanged on 412."""

    @abstractmethod
    def _get(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        *,
        start: int,
        end: int | None,
        deadline: float,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> PartResponse:
        """One GET of bytes [start, end) (``end`` None: to the end of the object).

        The answer's ``start``/``end`` are what the server sent (checked against
        the request); a first request (start 0) of an empty object answers an
        empty body. Raises ObjectChanged on 412, NotModified on 304.
        """

    # -- public ------------------------------------------------------------------------

    def head(self, bucket: str, key: str, version_id: str | None, *, deadline: float) -> ObjectMeta:
        """HEAD with retries."""
        return self._retrying(lambda: self._head(bucket, key, version_id, deadline), deadline)

    def revalidate(
        self, bucket: str, key: str, etag: str, *, deadline: float, version_id: str | None = None
    ) -> PartResponse | None:
        """None if the object still has ``etag`` (one 304); else the new first part, open.

        The caller hands the answer to :meth:`fetch` as ``first`` (the new bytes
        started arriving in the same round trip) or closes it.
        """
        try:
            return self._retrying(
                lambda: self._get(
                    bucket, key, version_id, start=0, end=self.part_size, deadline=deadline,
                    if_none_match=etag,
                ),
                deadline,
            )  # fmt: skip
        except NotModified:
            return None

    def fetch(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        sink: BlobSink,
        *,
        max_bytes: int,
        deadline: float,
        first: PartResponse | None = None,
        on_meta: Callable[[ObjectMeta], None] | None = None,
    ) -> Fetched:
        """Download one object into ``sink``, verified.

        ``first`` is an already open first part (from :meth:`revalidate`);
        ``on_meta`` sees the object's metadata before anything is written (the
        service reserves room there) and may raise to refuse it.
        """
        restarts = failures = 0
        while True:
            try:
                if first is None:
                    first = self._retrying(
                        lambda: self._get(
                            bucket, key, version_id, start=0, end=self.part_size, deadline=deadline
                        ),
                        deadline,
                    )
                else:
                    first.set_deadline(deadline)
                return self._download(first, sink, max_bytes, deadline, on_meta)
            except ObjectChanged:
                restarts += 1
                if restarts > self.retry.max_restarts:
                    raise Unavailable(
                        "object kept changing during download; try again later"
                    ) from None
                log.info("object changed during download; starting again", bucket=bucket, key=key)
            except IntegrityError as exc:
                failures += 1
                log.warning("downloaded bytes failed verification", bucket=bucket, key=key,
                            error=exc.message)  # fmt: skip
                if failures >= self.retry.max_attempts:
                    raise
                self._pause(failures, deadline, exc)
            finally:
                if first is not None:
                    first.close()
                first = None

    # -- the download --------------------------------------------------------------------

    def _download(
        self,
        first: PartResponse,
        sink: BlobSink,
        max_bytes: int,
        deadline: float,
        on_meta: Callable[[ObjectMeta], None] | None,
    ) -> Fetched:
        meta = first.meta
        if meta.size > max_bytes:
            raise TooLarge(f"object is {meta.size} bytes, over the limit of {max_bytes} bytes")
        if on_meta is not None:
            on_meta(meta)
        sink.reset()
        sink.allocate(meta.size)
        digests = _Digests(meta)
        digests.add_checksums(meta)
        job = _Job(meta, [_Part(0, min(first.end, meta.size))], deadline)
        # No MD5 and no checksum yet: ask HEAD for S3's full-object checksums,
        # beside the parts, never before the first GET.
        head: Future[ObjectMeta] | None = None
        if meta.md5 is None and not meta.checksums and meta.size > 0:
            head = _HEAD_POOL.submit(
                self._head, meta.bucket, meta.key, meta.version_id, deadline, if_match=meta.etag
            )
        if job.parts[0].end >= meta.size:
            self._fetch_part(job, sink, 0, first, inline=digests)
        else:
            self._run_parts(job, sink, first, digests, head)
        if head is not None:
            meta = self._with_head(meta, head, deadline)
            late = digests.add_checksums(meta)
            if late:
                self._catch_up(sink, digests, late, meta.size)
        if digests.size != meta.size:
            raise Unavailable("S3 response body was truncated", detail=f"{digests.size} bytes")
        digest = digests.verify(meta)
        return Fetched(meta=meta, sha256=digest, size=meta.size)

    def _with_head(self, meta: ObjectMeta, head: Future[ObjectMeta], deadline: float) -> ObjectMeta:
        try:
            seen = head.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise Timeout("deadline passed while waiting for HEAD") from None
        except ObjectChanged:
            raise
        except AssetError as exc:
            # the bytes are pinned and sized; only the extra checksum is missing
            log.warning("HEAD for checksums failed; verified by size only", error=exc.message)
            return meta
        if seen.etag != meta.etag or seen.size != meta.size:
            raise ObjectChanged(meta.key)
        return replace(meta, checksums=seen.checksums, composite=seen.composite)

    def _plan(self, size: int, first_end: int, connections: int | None = None) -> list[_Part]:
        """Part 0 is the first response; the rest split into at least ``connections`` parts."""
        connections = connections or self.max_concurrency
        parts = [_Part(0, min(first_end, size))]
        rest = size - parts[0].end
        if rest <= 0:
            return parts
        share = math.ceil(rest / (PARTS_PER_CONNECTION * connections))
        part = max(self.part_size, min(self.max_part, share))
        count = max(
            math.ceil(rest / part),
            min(connections, math.ceil(rest / MIN_PART)),
        )
        step = math.ceil(rest / count)
        for start in range(parts[0].end, size, step):
            parts.append(_Part(start, min(size, start + step)))
        return parts

    def _run_parts(
        self,
        job: _Job,
        sink: BlobSink,
        first: PartResponse,
        digests: _Digests,
        head: Future[ObjectMeta] | None,
    ) -> None:
        workers = [
            threading.Thread(
                target=self._part_worker, args=(job, sink, first), name="assetd-part", daemon=True
            )
        ]
        workers[0].start()
        try:
            connections = self._connections(job, first.arrived)
            plan = self._plan(job.meta.size, job.parts[0].end, connections)
            with job.cond:
                job.parts += plan[1:]
                job.connections = connections
                job.planned = True
                job.cond.notify_all()
            more = [
                threading.Thread(
                    target=self._part_worker,
                    args=(job, sink, None),
                    name="assetd-part",
                    daemon=True,
                )
                for _ in range(min(connections, len(job.parts)) - 1)
            ]
            workers += more
            for w in more:
                w.start()
            self._hash_prefix(job, sink, digests)
        except BaseException as exc:
            job.fail(exc)
            raise
        finally:
            for w in workers:
                if w.ident is not None:  # a thread that failed to start has nothing to join
                    w.join()
        if job.error is not None:
            raise job.error

    def _connections(self, job: _Job, arrived: float) -> int:
        """Connections for this download: few if the first response alone is fast."""
        fast = min(self.fast_link_connections, self.max_concurrency)
        if fast == self.max_concurrency:
            return fast
        first = job.parts[0]
        probe = min(PROBE_BYTES, first.end)
        until = arrived + self.probe_window_s
        with job.cond:
            # the clock first: bytes seen after the window (buffered while on_meta
            # made room, say) say nothing about the link
            while job.error is None:
                left = until - time.monotonic()
                if left <= 0:
                    return self.max_concurrency
                if first.done >= probe:
                    return fast
                job.cond.wait(left)
        return fast

    def _ahead(self, job: _Job) -> int:
        """How far downloads may run past the hashed offset: two rounds of parts."""
        step = job.parts[1].end - job.parts[1].start if len(job.parts) > 1 else 0
        return 2 * job.connections * max(self.part_size, step)

    def _part_worker(self, job: _Job, sink: BlobSink, first: PartResponse | None) -> None:
        try:
            if first is not None:
                self._fetch_part(job, sink, 0, first)
            while True:
                with job.cond:
                    while job.error is None and (
                        not job.planned
                        or (
                            job.next_part < len(job.parts)
                            and job.parts[job.next_part].start >= job.hashed + self._ahead(job)
                        )
                    ):
                        job.cond.wait(0.5)
                        if time.monotonic() >= job.deadline or self.stopping.is_set():
                            break
                    if job.error is not None or job.next_part >= len(job.parts):
                        return
                    index = job.next_part
                    job.next_part += 1
                self._fetch_part(job, sink, index)
        except BaseException as exc:
            job.fail(exc)

    def _fetch_part(
        self,
        job: _Job,
        sink: BlobSink,
        index: int,
        resp: PartResponse | None = None,
        *,
        inline: _Digests | None = None,
    ) -> None:
        """Download one part, resuming after failures; ``inline`` hashes as it goes."""
        part = job.parts[index]
        meta = job.meta
        buf = memoryview(bytearray(min(CHUNK, max(1, part.end - part.start))))
        attempt = 0
        while not part.complete or resp is not None:
            if job.error is not None:
                return
            try:
                if self.stopping.is_set():
                    raise Unavailable("assetd is shutting down")
                _check_deadline(job.deadline, "downloading")
                if resp is None:
                    resp = self._get(
                        meta.bucket, meta.key, meta.version_id,
                        start=part.start + part.done, end=part.end, deadline=job.deadline,
                        if_match=meta.etag or None,
                    )  # fmt: skip
                    _check_range(resp, part.start + part.done, part.end, meta)
                self._drain(job, part, resp, sink, buf, inline=inline)
                resp.close()
                resp = None
                # another part may have ended the job: then this one stops unfinished (loop top)
                if not part.complete and job.error is None:
                    raise Unavailable(
                        "S3 response body was truncated", detail=f"part at {part.start}"
                    )
            except AssetError as exc:
                if resp is not None:
                    resp.close()
                    resp = None
                # a full disk is no fault of S3's: asking again only downloads more to drop
                if not exc.retryable or isinstance(exc, Timeout | CacheFull):
                    raise
                attempt += 1
                if attempt >= self.retry.max_attempts:
                    if isinstance(exc, IntegrityError):
                        raise
                    raise Unavailable(
                        f"S3 kept failing after {self.retry.max_attempts} attempts",
                        detail=_describe(exc),
                    ) from exc
                self._pause(attempt, job.deadline, exc)
            except BaseException:
                if resp is not None:
                    resp.close()
                raise

    @staticmethod
    def _drain(
        job: _Job,
        part: _Part,
        resp: PartResponse,
        sink: BlobSink,
        buf: memoryview,
        *,
        inline: _Digests | None,
    ) -> None:
        """Copy one response body to its offsets as bytes arrive, a buffer (or 128 KiB) a write."""
        filled = 0
        flush_at = _FLUSH_AT if inline is None else _INLINE_FLUSH_AT
        while True:
            n = resp.readinto(buf[filled:])
            filled += n
            if filled and (not n or filled >= flush_at):
                offset = part.start + part.done
                if offset + filled > part.end:
                    raise Unavailable("S3 sent more bytes than the range asked for")
                sink.pwrite(buf[:filled], offset)
                if inline is not None:
                    inline.feed(buf[:filled])
                with job.cond:
                    part.done += filled
                    job.cond.notify_all()
                filled = 0
            if not n or job.error is not None:  # no reading on after another part failed
                return

    def _hash_prefix(self, job: _Job, sink: BlobSink, digests: _Digests) -> None:
        """Hash the contiguous prefix as parts fill it, reading back from the page cache."""
        buf = memoryview(bytearray(CHUNK))
        size = job.meta.size
        while digests.size < size:
            with job.cond:
                while job.error is None and job.contiguous() <= digests.size:
                    if time.monotonic() >= job.deadline:
                        raise Timeout("deadline passed while downloading")
                    job.cond.wait(0.5)
                if job.error is not None:
                    return
                upto = job.contiguous()
            while digests.size < upto:
                n = sink.pread(buf[: min(CHUNK, upto - digests.size)], digests.size)
                if n <= 0:
                    raise Unavailable("staged file shorter than the bytes written to it")
                digests.feed(buf[:n])
            with job.cond:
                job.hashed = digests.size
                job.cond.notify_all()

    def _catch_up(self, sink: BlobSink, digests: _Digests, late: list[str], upto: int) -> None:
        """Run checksums learnt after hashing began over the bytes already hashed."""
        buf = memoryview(bytearray(CHUNK))
        done = 0
        while done < upto:
            n = sink.pread(buf[: min(CHUNK, upto - done)], done)
            if n <= 0:
                raise Unavailable("staged file shorter than the bytes written to it")
            digests.feed(buf[:n], only=late)
            done += n

    # -- retries ---------------------------------------------------------------------------

    def _pause(self, attempt: int, deadline: float, last: BaseException) -> None:
        pause = self.retry.delay(attempt)
        if time.monotonic() + pause >= deadline:
            raise Timeout("deadline passed while retrying S3", detail=repr(last))
        if self.stopping.wait(pause):
            raise Unavailable("assetd is shutting down")

    def _retrying(self, attempt: Callable[[], T], deadline: float) -> T:
        last: AssetError | None = None
        for n in range(1, self.retry.max_attempts + 1):
            _check_deadline(deadline, "contacting S3")
            if self.stopping.is_set():
                raise Unavailable("assetd is shutting down")
            try:
                return attempt()
            except AssetError as exc:
                if not exc.retryable or isinstance(exc, Timeout):
                    raise
                last = exc
            if n == self.retry.max_attempts:
                break
            self._pause(n, deadline, last)
        if isinstance(last, IntegrityError):
            raise last
        raise Unavailable(
            f"S3 kept failing after {self.retry.max_attempts} attempts",
            detail=_describe(last),
        )


def _describe(exc: BaseException | None) -> str:
    """An error and its detail, for the log of the error that ends the retries."""
    detail = getattr(exc, "detail", None)
    return f"{exc!r}: {detail}" if detail else repr(exc)


def _check_range(resp: PartResponse, start: int, end: int, meta: ObjectMeta) -> None:
    """A part's answer must be the range asked for, of the object the first part saw."""
    if resp.start != start or resp.end != end or resp.meta.size != meta.size:
        resp.close()
        log.warning(
            "S3 answered another range than asked",
            asked=f"{start}-{end}",
            got=f"{resp.start}-{resp.end}/{resp.meta.size}",
        )
        raise Unavailable("S3 answered another byte range than the one asked for")
    if meta.etag and resp.meta.etag and resp.meta.etag != meta.etag:
        resp.close()
        raise ObjectChanged(meta.key)


# HEADs for checksums run beside the parts; few and short.
_HEAD_POOL = ThreadPoolExecutor(4, thread_name_prefix="assetd-head")
