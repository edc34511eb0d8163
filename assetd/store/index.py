"""Index rows: the in-memory mirror over diskcache, flushing pins, and the totals.

Index rows:

    ("obj", bucket, key, "v:<version>" | "e:<etag>")  -> Entry fields
    ("cur", bucket, key)    -> {"tag", "checked_at"}: latest for unversioned requests
    ("blob", sha256)        -> [size, mtime_ns, ctime_ns, inode]: stat fingerprint
    ("dig", bucket, key, sha256) -> [tag]: which obj row of the key holds that content

A refetch after an overwrite adds an obj row and moves ``cur``; the older
obj rows stay until eviction, and ``dig`` finds them, so a ``sha256`` pin
to older content is still served (:meth:`Store.lookup_content`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import diskcache

from assetd.errors import AssetError, CacheFull, InternalError
from assetd.log import get_logger
from assetd.store.lock import Ownership

log = get_logger("assetd.store")
HEADROOM_BYTES = 1 << 20  # kept allocated so promised pins can be written on a full disk


def _is_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def _index_error(exc: BaseException, what: str) -> AssetError:
    """An index (SQLite) or disk failure as the retryable error a client sees."""
    if isinstance(exc, AssetError):
        return exc
    if _is_full(exc):
        return CacheFull("no room left in the asset cache", detail=f"{what}: {exc}")
    return InternalError("asset cache I/O error", detail=f"{what}: {exc}")


@dataclass(frozen=True, slots=True)
class Entry:
    sha256: str
    size: int
    etag: str
    version_id: str | None
    fetched_at: float
    last_access: float
    pinned_until: float


_MISSING = object()


class RowIndex(Ownership):
    """The store's layer of rows: memory first, the index behind it."""

    index: diskcache.Cache
    _lock: threading.RLock
    _rows: dict[tuple[str, ...], Any]
    _dirty: set[tuple[str, ...]]
    # access time and pin per obj row; kept apart so a hit allocates nothing
    _pins: dict[tuple[str, ...], tuple[float, float]]
    _totals: list[int] | None  # [entries, bytes], counted on first use
    # set while pins cannot be recorded: touch() raises it instead of pinning
    pin_fault: AssetError | None
    _headroom: Path
    _headroom_ok: bool

    @staticmethod
    def _load(k: tuple[str, ...], raw: Any) -> Any:
        if k[0] == "obj":
            return Entry(**raw)
        if k[0] == "cur":
            return (raw["tag"], float(raw["checked_at"]))
        return tuple(raw)

    @staticmethod
    def _dump(k: tuple[str, ...], value: Any) -> Any:
        if k[0] == "obj":
            return asdict(value)
        if k[0] == "cur":
            return {"tag": value[0], "checked_at": value[1]}
        return list(value)

    def _get(self, k: tuple[str, ...], *, memory_only: bool = False) -> Any:
        value = self._rows.get(k, _MISSING)
        if value is not _MISSING or memory_only:
            return value
        # under the lock: a row deleted between our read and our caching
        # would otherwise come back from the dead
        with self._lock:
            value = self._rows.get(k, _MISSING)
            if value is not _MISSING:
                return value
            raw = self.index.get(k)
            if raw is None:
                return None
            value = self._rows[k] = self._load(k, raw)
            return value

    def _set(self, k: tuple[str, ...], value: Any, *, durable: bool = True) -> None:
        with self._lock:
            self._rows[k] = value
            if durable:
                self.index.set(k, self._dump(k, value))
                self._dirty.discard(k)
            else:
                self._dirty.add(k)

    def _delete(self, k: tuple[str, ...]) -> None:
        with self._lock:
            self._rows.pop(k, None)
            self._pins.pop(k, None)
            self._dirty.discard(k)
            self.index.delete(k)

    def _current(self, k: tuple[str, ...]) -> Any:
        value = self._rows[k]
        pin = self._pins.get(k)
        if pin is not None and k[0] == "obj":
            value = replace(value, last_access=pin[0], pinned_until=pin[1])
        return value

    def flush(self) -> int:
        """Write in-memory access times and pins to the index; returns rows written.

        On failure the rows stay dirty for the next try, and :meth:`touch`
        refuses new pins (``pin_fault``) until a flush succeeds with the
        headroom file back in place: a pin handed out either reaches the
        index or is never handed out. A disk-full failure first gives up the
        headroom file, so the pins already promised can still be written.
        """
        with self._lock:
            keys = [k for k in self._dirty if k in self._rows]
            dirty = [(k, self._dump(k, self._current(k))) for k in keys]
            self._dirty.difference_update(keys)
        try:
            if dirty:
                try:
                    self._write_rows(dirty)
                except sqlite3.OperationalError as exc:
                    if not _is_full(exc) or not self._release_headroom():
                        raise
                    self._write_rows(dirty)  # with the headroom given back
        except Exception as exc:
            with self._lock:
                self._dirty.update(k for k in keys if k in self._rows)
            err = _index_error(exc, "flush pins")
            self.pin_fault = err
            raise err from exc
        if self.pin_fault is not None or not self._headroom_ok:
            self._headroom_ok = self._make_headroom()
            if self._headroom_ok:
                self.pin_fault = None
            else:
                self.pin_fault = CacheFull(
                    "no room left in the asset cache",
                    detail="no headroom left to record pins in the index",
                )
        return len(dirty)

    def _write_rows(self, rows: list[tuple[tuple[str, ...], Any]]) -> None:
        with self.index.transact():
            for k, raw in rows:
                self.index.set(k, raw)

    def _make_headroom(self) -> bool:
        """Keep ``HEADROOM_BYTES`` allocated for index writes; True if they are there."""
        if not self.owner:
            return True  # only the owner flushes pins for the daemon
        try:
            fd = os.open(self._headroom, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, HEADROOM_BYTES)
            finally:
                os.close(fd)
        except OSError:
            with contextlib.suppress(OSError):
                if os.stat(self._headroom).st_blocks * 512 < HEADROOM_BYTES:
                    os.unlink(self._headroom)
            return False
        return True

    def _release_headroom(self) -> bool:
        try:
            os.unlink(self._headroom)
        except OSError:
            return False
        self._headroom_ok = False
        log.warning("cache disk full: released the index headroom to record promised pins")
        return True

    def _adjust(self, *, entries: int = 0, size: int = 0) -> None:
        with self._lock:
            if self._totals is not None:
                self._totals[0] += entries
                self._totals[1] += size

    def _scan_index(self) -> Iterator[tuple[Any, Any]]:
        """Every (key, value) of the index in one SQL pass.

        ``iterkeys`` plus ``get`` costs a query per row (about 30 s for
        300,000 rows here); this reads them all in one statement, through
        diskcache's own decoding. Falls back to the slow path if diskcache's
        internals ever change shape.
        """
        try:
            disk = self.index._disk
            rows = self.index._sql("SELECT key, raw, mode, filename, value FROM Cache").fetchall()
            for key, raw, mode, filename, value in rows:
                yield disk.get(key, raw), disk.fetch(mode, filename, value, False)
        except (AttributeError, TypeError, ValueError):
            for key in self.index.iterkeys():
                yield key, self.index.get(key)

    def _load_all(self) -> dict[tuple[str, ...], Any]:
        """Every index row, loaded into memory (rows already there win: they are newer)."""
        loaded: dict[tuple[str, ...], Any] = {}
        for k, raw in self._scan_index():
            if (
                raw is not None
                and isinstance(k, tuple)
                and k
                and k[0] in ("obj", "cur", "blob", "dig")
            ):
                loaded[k] = self._load(k, raw)
        with self._lock:
            for k, value in loaded.items():
                self._rows.setdefault(k, value)
            return dict(self._rows)
