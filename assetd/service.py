"""The core: turn a source into a verified local path.

One direction only: source -> policy -> index -> single-flight -> fetcher
-> store -> path. The daemon calls :meth:`AssetService.resolve` in-process;
so do ``assetd check`` and the tests.
"""

from __future__ import annotations

import contextlib
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from assetd.catalog import Catalog
from assetd.config import Config
from assetd.errors import (
    AccessDenied,
    AssetError,
    BadRequest,
    CacheFull,
    ContentMismatch,
    InternalError,
    NotFound,
    TransientError,
    UnsupportedScheme,
)
from assetd.fetcher.base import Fetcher, ObjectMeta, PartResponse
from assetd.log import get_logger
from assetd.pins import check_sha256
from assetd.policy import Policy
from assetd.protocol import CacheStatus, Resolved
from assetd.singleflight import SingleFlight
from assetd.store import Entry, Hit, Store
from assetd.uri import AssetAlias, S3Source, parse_remote

__all__ = ["AssetService", "CacheStatus", "Resolved"]

log = get_logger("assetd.service")
_COUNTER = {"hit": "hits", "miss": "misses", "coalesced": "coalesced", "stale": "stale"}
NULL_VERSION = "null"  # S3's id for the unversioned slot of a key
_NEGATIVE_MAX = 10_000  # negative-cache rows; a flood of bad keys cannot grow memory


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


def _take(parts: list[PartResponse]) -> PartResponse | None:
    """The part, if no one took it yet: a fetch thread and a waiter that gave up may race."""
    try:
        return parts.pop()  # atomic, unlike a test then a pop
    except IndexError:
        return None


@dataclass(frozen=True, slots=True)
class _Ask:
    """One validated request, before any I/O."""

    text: str
    source: S3Source
    version_id: str | None
    policy: Policy
    sha256: str | None = None  # the content pin, if any
    alias: str | None = None  # the catalog name ``text`` stood for

    @property
    def flight_key(self) -> tuple[str, str, str | None]:
        return (self.source.bucket, self.source.key, self.version_id)


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
        self.catalog: Catalog | None = None
        self._alias_counts: Counter[tuple[str, str]] = Counter()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def reconfigure(self, config: Config) -> None:
        """Apply reloadable settings (allowlists, limits, freshness, S3) from a new config."""
        self.config = config
        self.policy = config.policy()
        fetcher = self.fetcher.reconfigured(config.s3)
        if fetcher is not self.fetcher:
            old, self.fetcher = self.fetcher, fetcher
            old.close()  # idle connections only: downloads in flight finish on it
        with self._lock:
            self._negative.clear()  # a new allowlist or new credentials may change the answer

    def set_catalog(self, catalog: Catalog | None) -> None:
        """Use a new asset catalog (start, SIGHUP, a saved catalog file)."""
        self.catalog = catalog
        with self._lock:
            # per-alias counts only for names that still stand for the same source:
            # metric labels stay bounded by the catalog's size
            keep = {(e.name, str(e.source)) for e in catalog.entries.values()} if catalog else set()
            self._alias_counts = Counter({k: n for k, n in self._alias_counts.items() if k in keep})

    def alias_counts(self) -> dict[str, dict[str, object]]:
        """Successful resolves per catalog name: ``{name: {resolved_source, resolves}}``."""
        with self._lock:
            return {
                name: {"resolved_source": source, "resolves": n}
                for (name, source), n in sorted(self._alias_counts.items())
            }

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count failures by code; turn a bug into ``internal`` rather than a crash."""
        try:
            yield
        except AssetError as exc:
            self.count_error(exc.code)
            raise
        except Exception as exc:
            self.count_error("internal")
            raise InternalError("internal error in assetd", detail=repr(exc)) from exc

    def count_error(self, code: str) -> None:
        """Count a failure, including ones the daemon answers before reaching the service."""
        with self._lock:
            self.errors[code] += 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        """Copies of (counters, errors by code), consistent with each other."""
        with self._lock:
            return dict(self.counters), dict(self.errors)

    def _ask(self, text: str, version_id: str | None, sha256: object = None) -> _Ask:
        parsed = parse_remote(text)
        version_id = _check_version_id(version_id)
        pin = check_sha256(sha256)
        alias = None
        if isinstance(parsed, AssetAlias):
            alias = parsed.name
            parsed, version_id, pin = self._from_catalog(parsed, version_id, pin)
        ask = _Ask(text, parsed, version_id, self.policy, pin, alias)
        ask.policy.check_source(parsed)  # an alias never widens the allowlists
        if pin is None:  # a pin is looked up in the index first: S3's memoed "no" comes after
            self._check_negative(ask.flight_key)
        return ask

    def _from_catalog(
        self, alias: AssetAlias, version_id: str | None, pin: str | None
    ) -> tuple[S3Source, str | None, str | None]:
        """The entry's source and pins; a request may only repeat what the entry says."""
        catalog = self.catalog
        if catalog is None:
            raise UnsupportedScheme("asset:// sources need a catalog, and none is configured")
        entry = catalog.get(alias.name)  # not_found, never negatively cached
        if version_id is not None and version_id != entry.version_id:
            raise BadRequest(f"version_id differs from the catalog entry of '{alias}'")
        if pin is not None and entry.sha256 is not None and pin != entry.sha256:
            raise BadRequest(f"sha256 differs from the catalog entry of '{alias}'")
        return entry.source, entry.version_id, entry.sha256 or pin

    def try_hit(
        self, source: str, version_id: str | None = None, sha256: object = None
    ) -> Resolved | None:
        """A fresh hit answered from memory alone, else None (then call :meth:`resolve`).

        Never blocks on disk or network, so the daemon calls it on its event
        loop. Requests refused before any I/O (parse, policy, a cached
        not_found) raise here at once.
        """
        with self._counted():
            ask = self._ask(source, version_id, sha256)
            if ask.sha256 is not None:
                hit = self.store.lookup_content(
                    ask.source.bucket, ask.source.key, ask.sha256, ask.version_id, memory_only=True
                )
                if hit is None:
                    return None
                ask.policy.check_size(hit.entry.size)
                return self._serve(ask, hit.entry, hit.path, "hit")
            hit = self.store.lookup(
                ask.source.bucket, ask.source.key, ask.version_id, memory_only=True
            )
            if hit is None or not self._fresh(ask, hit, time.time()):
                return None
            return self._serve(ask, hit.entry, hit.path, "hit")  # None: take the slow path

    def resolve(
        self,
        source: str,
        version_id: str | None = None,
        *,
        timeout_s: float | None = None,
        sha256: object = None,
    ) -> Resolved:
        """Resolve one source; raise an AssetError with a stable code on failure.

        With ``sha256``, the answer is exactly those bytes or an error
        (``content_mismatch`` when the object holds other content).
        """
        with self._counted():
            ask = self._ask(source, version_id, sha256)
            budget = self.config.s3.deadline_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + budget
            try:
                return self._lookup_or_fetch(ask, deadline)
            except (NotFound, AccessDenied) as exc:
                self._remember_negative(ask.flight_key, exc)
                raise

    def _remember_negative(self, key: tuple[str, str, str | None], exc: AssetError) -> None:
        ttl = self.config.cache.negative_ttl_s
        if ttl <= 0:
            return
        with self._lock:
            now = time.monotonic()
            held = self._negative.get(key)
            if held is not None and held[0] > now:
                return  # a repeat from memory (a pinned request's): the TTL runs from S3's answer
            if len(self._negative) >= _NEGATIVE_MAX:
                self._negative = {k: v for k, v in self._negative.items() if v[0] > now}
            if len(self._negative) < _NEGATIVE_MAX:
                self._negative[key] = (now + ttl, exc)

    def _check_negative(self, key: tuple[str, str, str | None]) -> None:
        """Re-raise a recent not_found / access_denied without asking S3 again."""
        if not self._negative:
            return
        with self._lock:
            cached = self._negative.get(key)
            if cached is None:
                return
            if cached[0] <= time.monotonic():
                del self._negative[key]
                return
        raise type(cached[1])(cached[1].message, detail="negative cache")

    def _fresh(self, ask: _Ask, hit: Hit, now: float) -> bool:
        ask.policy.check_size(hit.entry.size)  # a limit lowered by reload applies to hits too
        # "null" names the unversioned slot, which an overwrite replaces: not immutable
        immutable = ask.version_id is not None and ask.version_id != NULL_VERSION
        if ask.sha256 is not None and hit.entry.sha256 != ask.sha256 and not immutable:
            return False  # the pin names other content: only S3 can say what is current now
        return immutable or now - hit.checked_at < self.config.cache.revalidate_after_s

    def _serve(self, ask: _Ask, entry: Entry, path: Path, cache: CacheStatus) -> Resolved | None:
        """The answer for ``entry``, pinned; None if it was evicted or quarantined meanwhile."""
        if ask.sha256 is not None and entry.sha256 != ask.sha256:
            raise ContentMismatch.for_digests(ask.sha256, entry.sha256)  # never other bytes
        pin = self.store.touch(
            ask.source.bucket,
            ask.source.key,
            entry,
            pinned_until=time.time() + self.config.cache.pin_seconds,
        )
        if pin is None:
            return None
        self._count(_COUNTER[cache])
        if ask.alias is not None:
            with self._lock:
                self._alias_counts[(ask.alias, str(ask.source))] += 1
        return Resolved(
            source=ask.text,
            path=path,
            size=entry.size,
            sha256=entry.sha256,
            etag=entry.etag,
            version_id=entry.version_id,
            cache=cache,
            pinned_until=pin,
            resolved_source=None if ask.alias is None else str(ask.source),
        )

    def _lookup_or_fetch(self, ask: _Ask, deadline: float) -> Resolved:
        for _ in range(3):  # an entry evicted between lookup and pin: look again
            answer = self._lookup_or_fetch_once(ask, deadline)
            if answer is not None:
                return answer
        raise CacheFull("the cache is evicting faster than it can serve; try again")

    def _lookup_or_fetch_once(self, ask: _Ask, deadline: float) -> Resolved | None:
        bucket, key = ask.source.bucket, ask.source.key
        if ask.sha256 is not None:
            # the pinned bytes, if this key ever held them: no S3 request, whatever S3 says now
            pinned = self.store.lookup_content(bucket, key, ask.sha256, ask.version_id)
            if pinned is not None:
                ask.policy.check_size(pinned.entry.size)
                answer = self._serve(ask, pinned.entry, pinned.path, "hit")
                if answer is not None:
                    return answer
            self._check_negative(ask.flight_key)
        hit = self.store.lookup(bucket, key, ask.version_id)
        # the first part of a changed object, from the revalidating GET: handed to
        # the fetch so the new bytes need no second round trip, else closed below
        first: list[PartResponse] = []
        try:
            if hit is not None:
                if self._fresh(ask, hit, time.time()):
                    return self._serve(ask, hit.entry, hit.path, "hit")
                try:
                    # a version_id here is the literal "null": the unversioned slot
                    changed = self.fetcher.revalidate(
                        bucket, key, hit.entry.etag, deadline=deadline, version_id=ask.version_id
                    )
                except TransientError:
                    if not self.config.cache.serve_stale_on_error or ask.sha256 is not None:
                        raise  # a pinned request never gets other bytes, stale or not
                    # S3 unreachable: the copy we verified earlier beats failing a grade
                    log.warning("serving stale copy", source=ask.text, sha256=hit.entry.sha256)
                    return self._serve(ask, hit.entry, hit.path, "stale")
                if changed is not None:
                    first.append(changed)
                if changed is None or changed.meta.etag == hit.entry.etag:  # None: 304
                    self.store.mark_checked(bucket, key, ask.version_id)
                    answer = self._serve(ask, hit.entry, hit.path, "hit")
                    if answer is not None:
                        return answer
                    # evicted while we asked S3: fetch it again
            (entry, path), shared = self._flight.do(
                ask.flight_key,
                lambda: self._fetch(ask, _take(first)),
                timeout=max(0.0, deadline - time.monotonic()),
            )
            return self._serve(ask, entry, path, "coalesced" if shared else "miss")
        finally:
            part = _take(first)  # not handed to a fetch: ours to close
            if part is not None:
                part.close()

    def _fetch(self, ask: _Ask, first: PartResponse | None) -> tuple[Entry, Path]:
        # the download has its own deadline: waiters may give up, the cache still fills
        deadline = time.monotonic() + self.config.s3.deadline_s
        cache = self.config.cache
        with contextlib.ExitStack() as room, self.store.staged() as staged:

            def reserve(meta: ObjectMeta) -> None:
                """The first response gave the size: refuse or make room before writing."""
                ask.policy.check_size(meta.size)  # before making room: a refusal evicts nothing
                room.close()  # a restart (object changed) reserves again for the new size
                room.enter_context(
                    self.store.reserve(
                        meta.size, max_bytes=cache.max_bytes, min_free_bytes=cache.min_free_bytes
                    )
                )

            fetched = self.fetcher.fetch(
                ask.source.bucket,
                ask.source.key,
                ask.version_id,
                staged,
                max_bytes=ask.policy.max_object_bytes,
                deadline=deadline,
                first=first,
                on_meta=reserve,
            )
            self._count("bytes_fetched", fetched.size)
            return self.store.commit(
                staged,
                bucket=ask.source.bucket,
                key=ask.source.key,
                sha256=fetched.sha256,
                size=fetched.size,
                etag=fetched.meta.etag,
                version_id=fetched.meta.version_id,
                requested_version=ask.version_id,
                pinned_until=time.time() + self.config.cache.pin_seconds,
            )
