"""An in-memory fetcher for unit tests: objects in a dict, faults on demand."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from assetd.errors import AssetError, NotFound
from assetd.fetcher.base import (
    Fetcher,
    NotModified,
    ObjectChanged,
    ObjectMeta,
    PartResponse,
    RetryPolicy,
)

__all__ = ["MemoryFetcher", "StoredObject"]


@dataclass
class StoredObject:
    data: bytes
    etag: str
    version_id: str | None = None
    # full-object checksums as S3 returns them: algorithm -> base64
    checksums: dict[str, str] = field(default_factory=dict)


@dataclass
class _Faults:
    head: deque[AssetError] = field(default_factory=deque)
    get: deque[AssetError] = field(default_factory=deque)


class _MemoryPart:
    def __init__(
        self, fetcher: MemoryFetcher, meta: ObjectMeta, data: bytes, start: int, end: int
    ) -> None:
        self.meta, self.start, self.end = meta, start, end
        self.arrived = time.monotonic()
        self._view = memoryview(data)[start:end]
        self._fetcher: MemoryFetcher | None = fetcher
        fetcher._opened(+1)

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), len(self._view), 64 << 10)
        buf[:n] = self._view[:n]
        self._view = self._view[n:]
        if self._fetcher is not None and self._fetcher.rate_bps:
            time.sleep(n / self._fetcher.rate_bps)  # one connection's cap
        return n

    def set_deadline(self, deadline: float) -> None:
        return None

    def close(self) -> None:
        if self._fetcher is not None:
            self._fetcher._opened(-1)
            self._fetcher = None


class MemoryFetcher(Fetcher):
    """Objects live in ``self.objects[(bucket, key)]``; versions are kept too."""

    def __init__(
        self,
        retry: RetryPolicy | None = None,
        *,
        part_size: int = 4 << 20,
        max_concurrency: int = 4,
        rate_bps: float | None = None,
    ) -> None:
        super().__init__(
            retry or RetryPolicy(base_delay_s=0.0, max_delay_s=0.0),
            part_size=part_size,
            max_concurrency=max_concurrency,
        )
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.versions: dict[tuple[str, str, str], StoredObject] = {}
        self.faults = _Faults()
        self._seq = 0
        self.rate_bps = rate_bps  # bytes/s per response, like a capped connection
        self.open_responses = self.peak_open_responses = 0
        self._open_lock = threading.Lock()

    def _opened(self, delta: int) -> None:
        with self._open_lock:
            self.open_responses += delta
            self.peak_open_responses = max(self.peak_open_responses, self.open_responses)

    def put(
        self, bucket: str, key: str, data: bytes, *, versioned: bool = False, checksum: bool = False
    ) -> StoredObject:
        self._seq += 1
        obj = StoredObject(
            data=data,
            etag=f'"{hashlib.md5(data).hexdigest()}"',  # noqa: S324 - S3's ETag is an MD5
            version_id=f"v{self._seq}" if versioned else None,
            checksums={"sha256": base64.b64encode(hashlib.sha256(data).digest()).decode()}
            if checksum
            else {},
        )
        self.objects[(bucket, key)] = obj
        if obj.version_id:
            self.versions[(bucket, key, obj.version_id)] = obj
        return obj

    def _lookup(self, bucket: str, key: str, version_id: str | None) -> StoredObject:
        found = (
            self.versions.get((bucket, key, version_id))
            if version_id
            else self.objects.get((bucket, key))
        )
        if found is None:
            raise NotFound(f"object s3://{bucket}/{key} does not exist")
        return found

    def _meta(self, bucket: str, key: str, obj: StoredObject, *, whole: bool) -> ObjectMeta:
        full, composite = ObjectMeta.split_checksums(dict(obj.checksums), None)
        return ObjectMeta(
            bucket=bucket,
            key=key,
            size=len(obj.data),
            etag=obj.etag,
            version_id=obj.version_id,
            md5=ObjectMeta.md5_from_etag(obj.etag, encrypted=False),
            checksums=full if whole else (),
            composite=composite if whole else (),
        )

    def _head(
        self,
        bucket: str,
        key: str,
        version_id: str | None,
        deadline: float,
        *,
        if_match: str | None = None,
    ) -> ObjectMeta:
        self._count("head")
        if self.faults.head:
            raise self.faults.head.popleft()
        obj = self._lookup(bucket, key, version_id)
        if if_match is not None and obj.etag != if_match:
            raise ObjectChanged(key)
        return self._meta(bucket, key, obj, whole=True)

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
        self._count("get")
        if self.faults.get:
            raise self.faults.get.popleft()
        obj = self._lookup(bucket, key, version_id)
        if if_match is not None and obj.etag != if_match:
            raise ObjectChanged(key)
        if if_none_match is not None and obj.etag == if_none_match:
            raise NotModified(key)
        size = len(obj.data)
        stop = size if end is None else min(end, size)
        # like S3, a range answer carries no full-object checksum
        meta = self._meta(bucket, key, obj, whole=start == 0 and stop == size and end is None)
        return _MemoryPart(self, meta, obj.data, start, stop)
