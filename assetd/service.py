"""The core: turn a source into a verified local path.

One direction only: source -> policy -> index -> single-flight -> fetcher
-> store -> path. The daemon calls :meth:`AssetService.resolve` in-process;
so do ``assetd check`` and the tests.
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from assetd.config import Config
from assetd.errors import (
    AccessDenied,
    AssetError,
    BadRequest,
    InternalError,
    NotFound,
    TransientError,
)
from assetd.fetcher.base import Fetcher, ObjectMeta
from assetd.policy import Policy
from assetd.singleflight import SingleFlight
from assetd.store import Entry, Store
from assetd.uri import S3Source, parse_s3

__all__ = ["AssetService", "CacheStatus", "Resolved"]

CacheStatus = Literal["hit", "miss", "coalesced", "stale"]
_NEGATIVE_MAX = 10_000  # negative-cache rows; a flood of bad keys cannot grow memory


@dataclass(frozen=True, slots=True)
class Resolved:
    source: str
    path: Path
    size: int
    sha256: str
    etag: str
    version_id: str | None
    cache: CacheStatus
    pinned_until: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "etag": self.etag,
            "version_id": self.version_id,
            "cache": self.cache,
            "pinned_until": self.pinned_until,
        }


def _check_version_id(version_id: object) -> str | None:
    if version_id is None:
        return None
    if (
        not isinstance(version_id, str)
        or not version_id
        or len(version_id) > 1024
        or any(unicodedata.category(c) == "Cc" for c in version_id)
    ):
        raise BadRequest("version_id must be a non-empty string without control characters")
    return version_id


class AssetService:
    """Resolve ``s3://`` sources into blobs in the store."""

    def __init__(self, config: Config, fetcher: Fetcher, store: Store) -> None:
        self.config = config
        self.policy: Policy = config.policy()
        self.fetcher = fetcher
        self.store = store
        self._pool = ThreadPoolExecutor(config.daemon.workers, thread_name_prefix="assetd-fetch")
        self._flight: SingleFlight[tuple[Entry, Path]] = SingleFlight(self._pool.submit)
        self._lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._negative: dict[tuple[str, str, str | None], tuple[float, AssetError]] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def reconfigure(self, config: Config) -> None:
        """Apply reloadable settings (allowlists, limits) from a new config."""
        self.config = config
        self.policy = config.policy()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def resolve(
        self, source: str, version_id: str | None = None, *, timeout_s: float | None = None
    ) -> Resolved:
        """Resolve one source; raise an AssetError with a stable code on failure."""
        try:
            return self._resolve(source, version_id, timeout_s)
        except AssetError as exc:
            with self._lock:
                self.errors[exc.code] += 1
            raise
        except Exception as exc:  # a bug must not take the daemon down
            with self._lock:
                self.errors["internal"] += 1
            raise InternalError("internal error in assetd", detail=repr(exc)) from exc

    def _resolve(self, text: str, version_id: str | None, timeout_s: float | None) -> Resolved:
        source = parse_s3(text)
        version_id = _check_version_id(version_id)
        policy = self.policy
        policy.check_source(source)
        budget = self.config.s3.deadline_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + budget
        now = time.time()
        flight_key = (source.bucket, source.key, version_id)
        self._check_negative(flight_key)
        try:
            return self._lookup_or_fetch(
                text, source, version_id, policy=policy, deadline=deadline, now=now
            )
        except (NotFound, AccessDenied) as exc:
            if self.config.cache.negative_ttl_s > 0:
                with self._lock:
                    now_m = time.monotonic()
                    if len(self._negative) >= _NEGATIVE_MAX:
                        self._negative = {k: v for k, v in self._negative.items() if v[0] > now_m}
                    if len(self._negative) < _NEGATIVE_MAX:
                        expires = now_m + self.config.cache.negative_ttl_s
                        self._negative[flight_key] = (expires, exc)
            raise

    def _check_negative(self, key: tuple[str, str, str | None]) -> None:
        """Re-raise a recent not_found / access_denied without asking S3 again."""
        with self._lock:
            cached = self._negative.get(key)
            if cached is None:
                return
            if cached[0] <= time.monotonic():
                del self._negative[key]
                return
        raise type(cached[1])(cached[1].message, detail="negative cache")

    def _lookup_or_fetch(
        self,
        text: str,
        source: S3Source,
        version_id: str | None,
        *,
        policy: Policy,
        deadline: float,
        now: float,
    ) -> Resolved:
        pin = now + self.config.cache.pin_seconds
        hit = self.store.lookup(source.bucket, source.key, version_id)
        meta: ObjectMeta | None = None
        if hit is not None:
            policy.check_size(hit.entry.size)
            fresh = version_id is not None or (
                now - hit.checked_at < self.config.cache.revalidate_after_s
            )
            if not fresh:
                try:
                    meta = self.fetcher.head(source.bucket, source.key, None, deadline=deadline)
                except TransientError:
                    if not self.config.cache.serve_stale_on_error:
                        raise
                    # S3 unreachable: the copy we verified earlier beats failing a grade
                    entry = self.store.touch(source.bucket, source.key, hit.entry, pinned_until=pin)
                    self._count("stale")
                    return self._answer(text, entry, hit.path, "stale")
                if meta.etag == hit.entry.etag:
                    self.store.mark_checked(source.bucket, source.key, now=now)
                    fresh = True
            if fresh:
                entry = self.store.touch(source.bucket, source.key, hit.entry, pinned_until=pin)
                self._count("hits")
                return self._answer(text, entry, hit.path, "hit")

        (entry, path), shared = self._flight.do(
            (source.bucket, source.key, version_id),
            lambda: self._fetch(source, version_id, policy, pin, meta),
            timeout=max(0.0, deadline - time.monotonic()),
        )
        self._count("coalesced" if shared else "misses")
        if shared:
            entry = self.store.touch(source.bucket, source.key, entry, pinned_until=pin)
        return self._answer(text, entry, path, "coalesced" if shared else "miss")

    def _fetch(
        self,
        source: S3Source,
        version_id: str | None,
        policy: Policy,
        pinned_until: float,
        meta: ObjectMeta | None,
    ) -> tuple[Entry, Path]:
        # the download has its own deadline: waiters may give up, the cache still fills
        deadline = time.monotonic() + self.config.s3.deadline_s
        with self.store.staged() as staged:
            fetched = self.fetcher.fetch(
                source.bucket,
                source.key,
                version_id,
                staged,
                max_bytes=policy.max_object_bytes,
                deadline=deadline,
                meta=meta,
            )
            self._count("bytes_fetched", fetched.size)
            return self.store.commit(
                staged,
                bucket=source.bucket,
                key=source.key,
                sha256=fetched.sha256,
                size=fetched.size,
                etag=fetched.meta.etag,
                version_id=fetched.meta.version_id,
                requested_version=version_id,
                pinned_until=pinned_until,
            )

    @staticmethod
    def _answer(text: str, entry: Entry, path: Path, cache: CacheStatus) -> Resolved:
        return Resolved(
            source=text,
            path=path,
            size=entry.size,
            sha256=entry.sha256,
            etag=entry.etag,
            version_id=entry.version_id,
            cache=cache,
            pinned_until=entry.pinned_until,
        )
