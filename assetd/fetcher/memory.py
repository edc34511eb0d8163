"""An in-memory fetcher for unit tests: objects in a dict, faults on demand."""

from __future__ import annotations

import base64
import hashlib
import io
from collections import deque
from dataclasses import dataclass, field

from assetd.errors import AssetError, NotFound
from assetd.fetcher.base import Body, Fetcher, ObjectChanged, ObjectMeta, RetryPolicy

__all__ = ["MemoryFetcher", "StoredObject"]


@dataclass
class StoredObject:
    data: bytes
    etag: str
    version_id: str | None = None
    checksum_sha256: str | None = None


@dataclass
class _Faults:
    head: deque[AssetError] = field(default_factory=deque)
    get: deque[AssetError] = field(default_factory=deque)


class _MemoryBody(io.BytesIO):
    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        return super().readinto(buf)


class MemoryFetcher(Fetcher):
    """Objects live in ``self.objects[(bucket, key)]``; versions are kept too."""

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        super().__init__(retry or RetryPolicy(base_delay_s=0.0, max_delay_s=0.0))
        self.objects: dict[tuple[str, str], StoredObject] = {}
        self.versions: dict[tuple[str, str, str], StoredObject] = {}
        self.faults = _Faults()
        self._seq = 0

    def put(
        self, bucket: str, key: str, data: bytes, *, versioned: bool = False, checksum: bool = False
    ) -> StoredObject:
        self._seq += 1
        obj = StoredObject(
            data=data,
            etag=f'"{hashlib.md5(data).hexdigest()}"',  # noqa: S324 - S3's ETag is an MD5
            version_id=f"v{self._seq}" if versioned else None,
            checksum_sha256=base64.b64encode(hashlib.sha256(data).digest()).decode()
            if checksum
            else None,
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

    def _head(self, bucket: str, key: str, version_id: str | None, deadline: float) -> ObjectMeta:
        self._count("head")
        if self.faults.head:
            raise self.faults.head.popleft()
        obj = self._lookup(bucket, key, version_id)
        return ObjectMeta(
            bucket=bucket,
            key=key,
            size=len(obj.data),
            etag=obj.etag,
            version_id=obj.version_id,
            md5=ObjectMeta.md5_from_etag(obj.etag, encrypted=False),
            sha256=ObjectMeta.sha256_from_checksum(obj.checksum_sha256, None),
        )

    def _open(self, meta: ObjectMeta, deadline: float) -> Body:
        self._count("get")
        if self.faults.get:
            raise self.faults.get.popleft()
        obj = self._lookup(meta.bucket, meta.key, meta.version_id)
        if obj.etag != meta.etag:
            raise ObjectChanged(meta.key)
        return _MemoryBody(obj.data)
