"""What every fetcher shares: object metadata, the retry loop, verified streaming.

A concrete fetcher supplies two primitives, ``_head`` and ``_open``; this
module owns everything that must behave the same whatever the backend:
size limits, pinning the body to what HEAD saw, hashing in the same pass as
the write, verification, and bounded retries under one deadline.

Primitives raise :class:`~assetd.errors.AssetError`: a ``retryable`` one is
tried again with backoff, any other ends the fetch. :class:`ObjectChanged`
means the object was replaced since HEAD (HTTP 412): start again from HEAD.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import queue
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

from assetd.errors import (
    AssetError,
    IntegrityError,
    Timeout,
    TooLarge,
    Unavailable,
)

__all__ = [
    "BlobSink",
    "Body",
    "Fetched",
    "Fetcher",
    "ObjectChanged",
    "ObjectMeta",
    "RetryPolicy",
]

_PLAIN_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
CHUNK = 1 << 20
# Below this a body is hashed and written inline; above, a second thread
# hashes and writes while this one reads, which matters on 2 cores.
PIPELINE_MIN_BYTES = 4 << 20
PIPELINE_BUFFERS = 8
T = TypeVar("T")


class ObjectChanged(Exception):
    """The object no longer matches what HEAD saw (HTTP 412)."""


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What HEAD said about an object, reduced to what verification needs."""

    bucket: str
    key: str
    size: int
    etag: str
    version_id: str | None = None
    md5: str | None = None  # hex; set only when the ETag is a plain MD5 of the body
    sha256: str | None = None  # hex; S3's full-object SHA-256 checksum, when present

    @staticmethod
    def md5_from_etag(etag: str, *, encrypted: bool) -> str | None:
        """The body's MD5 if the ETag is one: not multipart, not KMS or SSE-C."""
        m = _PLAIN_MD5_ETAG.match(etag)
        return m.group(1).lower() if m and not encrypted else None

    @staticmethod
    def sha256_from_checksum(value: str | None, checksum_type: str | None) -> str | None:
        """Hex SHA-256 from S3's base64 checksum, if it covers the whole object."""
        if not value or "-" in value or checksum_type not in (None, "FULL_OBJECT"):
            return None  # composite (multipart) checksums are a hash of hashes
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return raw.hex() if len(raw) == 32 else None


@dataclass(frozen=True, slots=True)
class Fetched:
    meta: ObjectMeta
    sha256: str
    size: int


class BlobSink(Protocol):
    """Where a body goes: the store's staged temp file."""

    def write(self, data: memoryview) -> None: ...

    def reset(self) -> None: ...


class Body(Protocol):
    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    max_restarts: int = 3  # restarts from HEAD after the object changed mid-fetch

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


class _Hasher:
    """Counts, hashes and writes a body in order; hashlib and writes drop the GIL."""

    def __init__(self, sink: BlobSink, md5: bool) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None  # noqa: S324 - integrity check, not security
        self.size = 0

    def feed(self, data: memoryview) -> None:
        md5 = None if self.md5 is None else _MD5_POOL.submit(self.md5.update, data)
        self.sha.update(data)
        self.sink.write(data)
        if md5 is not None:
            md5.result()  # the buffer is reused after this returns
        self.size += len(data)


def _read_full(
    body: Body, buf: memoryview, deadline: float, stop: threading.Event | None = None
) -> int:
    """Fill ``buf`` unless the body ends first; returns the bytes read."""
    n = 0
    while n < len(buf):
        _check_deadline(deadline, "downloading")
        if stop is not None and stop.is_set():
            raise Unavailable("assetd is shutting down")
        got = body.readinto(buf[n:])
        if not got:
            break
        n += got
    return n


def stream_body(
    body: Body,
    sink: BlobSink,
    meta: ObjectMeta,
    deadline: float,
    stop: threading.Event | None = None,
) -> _Hasher:
    """Copy at most ``meta.size + 1`` bytes of ``body`` into ``sink``, hashing on the way."""
    hasher = _Hasher(sink, md5=meta.md5 is not None)
    limit = meta.size + 1  # one byte more than announced proves a lie without reading on
    if meta.size < PIPELINE_MIN_BYTES:
        buf = memoryview(bytearray(min(CHUNK, limit)))
        while hasher.size < limit:
            n = _read_full(body, buf[: min(len(buf), limit - hasher.size)], deadline, stop)
            if not n:
                break
            hasher.feed(buf[:n])
        return hasher
    return _stream_pipelined(body, hasher, limit, deadline, stop)


def _stream_pipelined(
    body: Body, hasher: _Hasher, limit: int, deadline: float, stop: threading.Event | None
) -> _Hasher:
    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(bytearray(CHUNK))
    failure: list[BaseException] = []

    def consume() -> None:
        while (item := full.get()) is not None:
            buf, n = item
            if not failure:
                try:
                    hasher.feed(memoryview(buf)[:n])
                except BaseException as exc:  # surfaced to the reader below
                    failure.append(exc)
            free.put(buf)

    worker = threading.Thread(target=consume, name="assetd-hash", daemon=True)
    worker.start()
    read = 0
    try:
        while read < limit and not failure:
            want = min(CHUNK, limit - read)
            buf = free.get()
            n = _read_full(body, memoryview(buf)[:want], deadline, stop)
            if n:
                full.put((buf, n))
                read += n
            if n < want:  # end of body
                break
    finally:
        full.put(None)
        worker.join()
    if failure:
        raise failure[0]
    return hasher


class Fetcher(ABC):
    """HEAD, then a GET pinned to it, streamed and verified, with bounded retries."""

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self.requests: Counter[str] = Counter()  # "head" / "get" sent to the backend
        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set at shutdown: downloads end with a clean error

    def abort(self) -> None:
        """Make in-flight and future fetches fail fast (daemon shutdown)."""
        self.stopping.set()

    def _count(self, op: str) -> None:
        with self._lock:
            self.requests[op] += 1

    @abstractmethod
    def _head(self, bucket: str, key: str, version_id: str | None, deadline: float) -> ObjectMeta:
        """One HEAD; raise an AssetError (retryable or not) on failure."""

    @abstractmethod
    def _open(self, meta: ObjectMeta, deadline: float) -> Body:
        """One GET pinned to ``meta`` (ETag / version); raise ObjectChanged on 412."""

    def head(self, bucket: str, key: str, version_id: str | None, *, deadline: float) -> ObjectMeta:
        """HEAD with retries."""
        return self._retrying(lambda: self._head(bucket, key, version_id, deadline), deadline)

    def revalidate(self, bucket: str, key: str, etag: str, *, deadline: float) -> ObjectMeta | None:
        """None if the object still has ``etag``, else its new metadata."""
        meta = self.head(bucket, key, None, deadline=deadline)
        return None if meta.etag == etag else meta

    def fetch(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        sink: BlobSink,
        *,
        max_bytes: int,
        deadline: float,
        meta: ObjectMeta | None = None,
    ) -> Fetched:
        """Download one object into ``sink``, verified; ``meta`` skips the first HEAD."""
        for _restart in range(self.retry.max_restarts + 1):
            if meta is None:
                meta = self.head(bucket, key, version_id, deadline=deadline)
            if meta.size > max_bytes:
                raise TooLarge(f"object is {meta.size} bytes, over the limit of {max_bytes} bytes")
            try:
                return self._retrying(partial(self._download, meta, sink, deadline), deadline)
            except ObjectChanged:
                meta = None  # replaced since HEAD: look again rather than mix versions
        raise Unavailable("object kept changing during download; try again later")

    def _download(self, meta: ObjectMeta, sink: BlobSink, deadline: float) -> Fetched:
        sink.reset()
        body = self._open(meta, deadline)
        try:
            hasher = stream_body(body, sink, meta, deadline, self.stopping)
        finally:
            body.close()
        if hasher.size > meta.size:
            raise TooLarge(
                f"object body is larger than the {meta.size} bytes its metadata announced"
            )
        if hasher.size < meta.size:
            raise Unavailable("S3 response body was truncated", detail=f"{hasher.size} bytes")
        digest = hasher.sha.hexdigest()
        if hasher.md5 is not None and hasher.md5.hexdigest() != meta.md5:
            raise IntegrityError("downloaded bytes do not match the object's MD5 ETag")
        if meta.sha256 is not None and digest != meta.sha256:
            raise IntegrityError("downloaded bytes do not match the object's SHA-256 checksum")
        return Fetched(meta=meta, sha256=digest, size=hasher.size)

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
            pause = self.retry.delay(n)
            if n == self.retry.max_attempts:
                break
            if time.monotonic() + pause >= deadline:
                raise Timeout("deadline passed while retrying S3", detail=repr(last))
            time.sleep(pause)
        if isinstance(last, IntegrityError):
            raise last
        raise Unavailable(
            f"S3 kept failing after {self.retry.max_attempts} attempts",
            detail=repr(last),
        )
