"""Eviction: LRU over unpinned entries, and room reserved for downloads in flight."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

from assetd.errors import CacheFull
from assetd.log import get_logger
from assetd.store.recovery import Recovery
from assetd.store.reports import EvictionReport

log = get_logger("assetd.store")


class Eviction(Recovery):
    """The store's layer of limits: ``max_bytes`` and ``min_free_bytes``."""

    _reserved: int  # bytes of downloads in flight, counted against the limits

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def evict(
        self,
        *,
        max_bytes: int,
        min_free_bytes: int,
        need: int = 0,
        low_water: float = 0.9,
        now: float | None = None,
    ) -> EvictionReport:
        """LRU over unpinned entries until ``need`` more bytes fit under both limits.

        Triggered by bytes over ``max_bytes`` or free space under
        ``min_free_bytes``; once triggered it goes down to ``low_water`` of
        ``max_bytes``, so eviction does not run on every miss. A blob is
        deleted only when no remaining entry names it. Index rows go first
        (the commit point), files after: a crash in between leaves only an
        unreferenced file, which recovery deletes.
        """
        self._ensure_recovered()
        now = time.time() if now is None else now
        report = EvictionReport()
        with self._exclusive(), self._lock:
            assert self._totals is not None
            total = self._totals[1] + self._reserved
            free = self.free_bytes() - self._reserved
            if total + need > max_bytes or free - need < min_free_bytes:
                goal_total = max(0, min(int(max_bytes * low_water), max_bytes - need))
                goal_free = min_free_bytes + need
                refs: dict[str, int] = {}
                for k, v in self._rows.items():
                    if k[0] == "obj":
                        refs[v.sha256] = refs.get(v.sha256, 0) + 1
                candidates = sorted(
                    (pin[0], k)
                    for k, v in self._rows.items()
                    if k[0] == "obj"
                    and (pin := self._pins.get(k) or (v.last_access, v.pinned_until))[1] <= now
                )
                most = self._freeable(candidates, refs)
                if need and (
                    total - most + need > max_bytes or free + most - need < min_free_bytes
                ):
                    candidates = []  # hopeless: keep the cache whole; the caller gets cache_full
                for _last, k in candidates:
                    if total <= goal_total and free >= goal_free:
                        break
                    sha = self._rows[k].sha256
                    self._drop_entry(k)
                    report.removed_entries += 1
                    refs[sha] -= 1
                    if refs[sha] == 0:
                        fp = self._get(("blob", sha))
                        size = int(fp[0]) if fp else 0
                        self._delete(("blob", sha))
                        self.blob_path(sha).unlink(missing_ok=True)
                        self._adjust(size=-size)
                        report.removed_blobs += 1
                        report.freed_bytes += size
                        total -= size
                        free += size
            report.bytes_after = self._totals[1]
            report.free_after = self.free_bytes()
            report.full = total + need > max_bytes or free - need < min_free_bytes
        if report.removed_entries:
            log.info("evicted", **report.to_dict())
        return report

    def _freeable(
        self, candidates: list[tuple[float, tuple[str, ...]]], refs: dict[str, int]
    ) -> int:
        """Bytes that evicting every candidate would free (a dry run)."""
        left, freed = dict(refs), 0
        for _last, k in candidates:
            sha = self._rows[k].sha256
            left[sha] -= 1
            if left[sha] == 0:
                fp = self._rows.get(("blob", sha))
                freed += int(fp[0]) if fp else 0
        return freed

    def _drop_entry(self, k: tuple[str, ...]) -> None:
        """Remove one obj row and the cur pointer that names it."""
        cur_key = ("cur", k[1], k[2])
        cur = self._rows.get(cur_key)
        if cur is not None and cur[0] == k[3]:
            self._delete(cur_key)
        dig_key = ("dig", k[1], k[2], self._rows[k].sha256)
        dig = self._rows.get(dig_key)
        if dig is not None and dig[0] == k[3]:
            self._delete(dig_key)
        self._delete(k)
        self._adjust(entries=-1)

    @contextlib.contextmanager
    def reserve(self, size: int, *, max_bytes: int, min_free_bytes: int) -> Iterator[None]:
        """Room for a download of ``size`` bytes, evicting if needed, else CacheFull."""
        self._ensure_recovered()  # before the lock: recovery takes it itself
        with self._lock:
            report = self.evict(max_bytes=max_bytes, min_free_bytes=min_free_bytes, need=size)
            if report.full:
                raise CacheFull(
                    "no room left in the asset cache",
                    detail=f"need {size} bytes; {report.bytes_after} cached, "
                    f"{report.free_after} free; nothing unpinned left to evict",
                )
            self._reserved += size
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= size
