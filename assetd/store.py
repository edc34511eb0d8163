"""The on-disk cache: content-addressed blobs plus a diskcache index.

Layout under the cache dir (DESIGN.md "Cache")::

    blobs/sha256/<2 hex>/<64 hex>   mode 0444, the bytes bind-mounted into sandboxes
    tmp/                            staged downloads, blob-<pid>-<random>.part
    quarantine/                     blobs whose bytes changed under us, kept for inspection
    index/                          diskcache (SQLite) rows
    lock                            flock held by the one process that owns the cache
    headroom                        1 MiB kept allocated so pins can be written on a full disk

Ownership: the daemon, and ``gc``/``verify`` when no daemon runs, open the
store with ``lock=True``: an exclusive ``flock`` on ``lock`` for as long as
the store is open, so two processes can never both act as the owner (a
second one gets :class:`CacheLocked`). Temp files carry their process's
pid; opening a store (and the daemon's housekeeping) removes only those of
processes that are gone or that were not written to for ``TEMP_GRACE_S``,
so it never takes a live download's file. Passes that delete files run
only under the lock.

Commit order, as in diskcache: write the blob under a unique temp name,
fsync, rename into place, and only then write the index row. The row is
the commit point; a crash before it leaves at worst an unreferenced blob,
never a row pointing at missing or partial bytes.
Readers treat a missing or changed blob as a miss.

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
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import diskcache

from assetd.errors import AssetError, CacheFull, InternalError, Unavailable
from assetd.log import get_logger

__all__ = [
    "CacheLocked",
    "Entry",
    "EvictionReport",
    "Hit",
    "RecoveryReport",
    "StagedBlob",
    "Store",
    "VerifyReport",
]

log = get_logger("assetd.store")
Fingerprint = tuple[int, int, int, int]
_WRITEBACK_EVERY = 1 << 20
HEADROOM_BYTES = 1 << 20  # kept allocated so promised pins can be written on a full disk
TEMP_GRACE_S = 600.0  # a temp file of a live pid untouched this long is a leftover
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    return fn


# Starting writeback while the download runs makes the final fsync cheap:
# for 256 MiB it is the difference between ~0.5 s and ~0.4 s here.
_sync_file_range = _load_sync_file_range()


def _fingerprint(st: os.stat_result) -> Fingerprint:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


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


def _disk_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFull("no room left in the asset cache", detail=f"{what}: {exc}")
    return InternalError("asset cache I/O error", detail=f"{what}: {exc}")


class CacheLocked(OSError):
    """Another process owns the cache (holds ``<cache>/lock``); never sent on the wire."""

    def __init__(self, root: Path, holder: int | None) -> None:
        who = f"process {holder}" if holder else "another process"
        super().__init__(errno.EWOULDBLOCK, f"the cache at {root} is in use by {who}")
        self.root = root
        self.holder = holder


def _pid_of_temp(name: str) -> int | None:
    """The pid in a ``blob-<pid>-<random>.part`` name, or None for any other name."""
    parts = name.split("-", 2)
    if len(parts) == 3 and parts[0] == "blob" and parts[1].isdigit():
        return int(parts[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclass(frozen=True, slots=True)
class Entry:
    sha256: str
    size: int
    etag: str
    version_id: str | None
    fetched_at: float
    last_access: float
    pinned_until: float


@dataclass
class EvictionReport:
    """What one eviction pass did; ``full`` means the limits still are not met."""

    freed_bytes: int = 0
    removed_entries: int = 0
    removed_blobs: int = 0
    bytes_after: int = 0
    free_after: int = 0
    full: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What start-up recovery found and mended."""

    removed_temps: int = 0
    dropped_rows: int = 0
    quarantined: int = 0
    deleted_blobs: int = 0
    entries: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """``assetd verify``: blobs re-hashed, and those whose bytes did not match their name."""

    checked: int = 0
    bytes: int = 0
    mismatched: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry  # as committed; access time and pin are below, current as of the lookup
    path: Path
    checked_at: float
    last_access: float
    pinned_until: float


class StagedBlob:
    """A temp file in ``tmp/`` that a download streams into (a ``BlobSink``)."""

    def __init__(self, tmp_dir: Path) -> None:
        try:
            # the pid in the name lets a non-owner tell a live download's file from a leftover
            self.fd, name = tempfile.mkstemp(
                prefix=f"blob-{os.getpid()}-", suffix=".part", dir=tmp_dir
            )
        except OSError as exc:
            raise _disk_error(exc, "create temp file") from exc
        self.path = Path(name)
        self.size = 0
        self._end = 0  # where write() appends
        self.sealed = False

    def allocate(self, size: int) -> None:
        """Reserve ``size`` bytes on disk up front: parts land at their offsets, ENOSPC early."""
        try:
            os.ftruncate(self.fd, size)
            if size:
                os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.size = size  # a file system without fallocate: ENOSPC comes at write
                return
            raise _disk_error(exc, "allocate temp file") from exc
        self.size = size

    def pwrite(self, data: memoryview, offset: int) -> None:
        try:
            view = data
            while view:
                view = view[os.pwrite(self.fd, view, offset + len(data) - len(view)) :]
        except OSError as exc:
            raise _disk_error(exc, "write temp file") from exc
        if _sync_file_range is not None and len(data) >= _WRITEBACK_EVERY // 4:
            # start writeback of these bytes so the final fsync has little left
            _sync_file_range(self.fd, offset, len(data), _SYNC_FILE_RANGE_WRITE)

    def pread(self, buf: memoryview, offset: int) -> int:
        """Read back bytes already written (from the page cache) for hashing."""
        try:
            return os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise _disk_error(exc, "read temp file") from exc

    def write(self, data: memoryview) -> None:
        """Append (sequential writers, e.g. tests and tools)."""
        self.pwrite(data, self._end)
        self._end += len(data)
        self.size = max(self.size, self._end)

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        self.size = self._end = 0
        self.sealed = False

    def seal(self) -> None:
        """Make the bytes durable and read-only before they get a public name."""
        try:
            os.fchmod(self.fd, 0o444)
            os.fsync(self.fd)
        except OSError as exc:
            raise _disk_error(exc, "fsync temp file") from exc
        self.sealed = True

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_MISSING = object()


class Store:
    """Blobs and index rows under one cache directory.

    Rows this process has read or written are mirrored in memory, so a cache
    hit costs dict lookups and one ``stat``, not SQLite queries. Access times
    and pins change on every hit; those updates stay in memory until
    :meth:`flush` (the daemon calls it every second, and on exit). Every
    other write goes to the index at once. Several processes may share the
    cache: a row another process changes is re-read here only after a miss,
    and the blob's stat fingerprint guards every hit either way. Passes that
    delete (recovery, eviction, verify) run only while holding the cache's
    lock, so never beside another owner's downloads and pins.
    """

    def __init__(self, root: str | os.PathLike[str], *, lock: bool = False) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        try:
            for d in (self.blobs, self.tmp, self.quarantine_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _disk_error(exc, f"create {self.root}") from exc
        self._lock_fd: int | None = self._take_lock() if lock else None
        try:
            self._staging: set[Path] = set()  # temp files of this store's downloads in flight
            self.removed_temps = self._clear_tmp(owner=lock)
            self._headroom = self.root / "headroom"
            self._headroom_ok = self._make_headroom()
            # set while pins cannot be recorded: touch() raises it instead of pinning
            self.pin_fault: AssetError | None = None
            self.index = diskcache.Cache(str(self.root / "index"), eviction_policy="none")
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._lock = threading.RLock()
        self._rows: dict[tuple[str, ...], Any] = {}
        self._dirty: set[tuple[str, ...]] = set()
        # access time and pin per obj row; kept apart so a hit allocates nothing
        self._pins: dict[tuple[str, ...], tuple[float, float]] = {}
        self._paths: dict[str, Path] = {}
        self._checked: dict[tuple[str, ...], float] = {}  # last S3 check of a version row
        self._totals: list[int] | None = None  # [entries, bytes], counted on first use
        self._reserved = 0  # bytes of downloads in flight, counted against the limits
        self._recovery_lock = threading.Lock()
        self.recovered = threading.Event()  # every row is in memory and checked
        self.recovery: RecoveryReport | None = None
        self._pass_mutex = threading.Lock()  # guards the two below (non-owners only)
        self._passes = 0  # destructive passes running in this store
        self._pass_fd = -1  # the lock file's fd while any of them runs

    def close(self) -> None:
        try:
            self.flush()
            self.index.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the last fd releases the flock
                self._lock_fd = None

    @property
    def owner(self) -> bool:
        """True if this store holds the cache's lock."""
        return self._lock_fd is not None

    def _take_lock(self) -> int:
        path = self.root / "lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _disk_error(exc, f"open {path}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = int(os.pread(fd, 32, 0).split()[0])
            except (OSError, ValueError, IndexError):
                holder = None
            os.close(fd)
            raise CacheLocked(self.root, holder) from None
        with contextlib.suppress(OSError):  # the pid is only for the message above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the cache for one destructive pass (recovery, eviction, verify).

        The owner holds it already. Any other store takes the lock for the
        pass, or raises :class:`CacheLocked`: a pass that deletes files must
        never run beside another process's live downloads and pins.
        """
        if self._lock_fd is not None:
            yield
            return
        # flock is per open file: threads of this store share one, or they would
        # refuse each other; a mutex only around the count keeps lock order simple
        with self._pass_mutex:
            if not self._passes:
                self._pass_fd = self._take_lock()
            self._passes += 1
        try:
            yield
        finally:
            with self._pass_mutex:
                self._passes -= 1
                if not self._passes:
                    os.close(self._pass_fd)

    def _clear_tmp(self, *, owner: bool) -> int:
        """Remove staged files a crash left behind; none of them were committed.

        Kept: this store's own downloads in progress; files of another live
        process written to within ``TEMP_GRACE_S`` (a pid can be reused, so
        an old file of a "live" pid is a leftover too); and, unless we own
        the cache, files named with our own pid (another store in this
        process may be writing them).
        """
        removed = 0
        now, me = time.time(), os.getpid()
        for child in self.tmp.iterdir():
            if child in self._staging:
                continue
            pid = _pid_of_temp(child.name)
            if pid == me and not owner:
                continue
            if pid is not None and pid != me and _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    if now - child.lstat().st_mtime < TEMP_GRACE_S:
                        continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed += 1
        return removed

    def sweep_tmp(self) -> int:
        """Remove temp files no live download owns (the daemon's housekeeping)."""
        removed = self._clear_tmp(owner=self.owner)
        if removed:
            log.info("removed stale temp files", removed=removed)
        return removed

    def blob_path(self, sha256: str) -> Path:
        path = self._paths.get(sha256)
        if path is None:
            path = self._paths[sha256] = self.blobs / sha256[:2] / sha256
        return path

    @contextlib.contextmanager
    def staged(self) -> Iterator[StagedBlob]:
        """A temp file for one download; removed unless committed."""
        blob = StagedBlob(self.tmp)
        self._staging.add(blob.path)
        try:
            yield blob
        finally:
            blob.discard()
            self._staging.discard(blob.path)

    @staticmethod
    def _tag(etag: str, version_id: str | None) -> str:
        return f"v:{version_id}" if version_id else f"e:{etag}"

    # -- rows: memory first, the index behind it ------------------------------

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

    # -- reads ------------------------------------------------------------------

    def _blob_ok(self, sha256: str) -> bool:
        """The blob's row exists and its file still has the recorded fingerprint."""
        expected = self._get(("blob", sha256))
        if expected is None:
            return False
        try:
            st = os.stat(self.blob_path(sha256))
        except OSError:
            return False
        return bool(expected == _fingerprint(st))

    def lookup(
        self, bucket: str, key: str, version_id: str | None, *, memory_only: bool = False
    ) -> Hit | None:
        """The cached entry, if its blob is still exactly what was committed.

        With ``memory_only``, answers None unless every row is already in
        memory, so the caller can take its slow path without touching SQLite.
        This is the hit path: plain dict lookups and one ``stat``.
        """
        rows = self._rows
        checked_at = 0.0
        if version_id:
            tag = "v:" + version_id
        else:
            cur = rows.get(("cur", bucket, key)) or (
                None if memory_only else self._get(("cur", bucket, key))
            )
            if cur is None:
                return None
            tag, checked_at = cur
        k = ("obj", bucket, key, tag)
        entry = rows.get(k) or (None if memory_only else self._get(k))
        if entry is None:
            return None
        if version_id == "null":  # the one version that is re-checked: when S3 last vouched for it
            checked_at = max(entry.fetched_at, self._checked.get(k, 0.0))
        sha = entry.sha256
        expected = rows.get(("blob", sha)) or (None if memory_only else self._get(("blob", sha)))
        if expected is None and memory_only:
            return None
        path = self._paths.get(sha) or self.blob_path(sha)
        try:
            st = os.stat(path)
            ok = expected == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            ok = False
        if not ok:
            self._invalidate(k, entry, expected)
            return None
        last_access, pinned_until = self._pins.get(k) or (entry.last_access, entry.pinned_until)
        return Hit(entry, path, checked_at, last_access, pinned_until)

    def _invalidate(self, k: tuple[str, ...], entry: Entry, expected: Any) -> None:
        """A hit whose blob failed its check: never served; the next fetch replaces it.

        Decided again under the lock, against what the check saw: a commit
        may have published a fresh blob meanwhile, and that one is kept.
        """
        sha = entry.sha256
        with self._lock:
            current = self._rows.get(("blob", sha))
            if current is not None and current == expected:
                try:
                    st = os.stat(self.blob_path(sha))
                    changed = _fingerprint(st) != current
                except FileNotFoundError:
                    changed = True
                if changed:
                    self.quarantine(sha, reason="stat fingerprint changed")
            if self._rows.get(k) is entry and ("blob", sha) not in self._rows:
                self._delete(k)
                self._adjust(entries=-1)

    def lookup_content(
        self,
        bucket: str,
        key: str,
        sha256: str,
        version_id: str | None,
        *,
        memory_only: bool = False,
    ) -> Hit | None:
        """An entry of this key (that version only, if given) whose bytes are ``sha256``.

        Any ETag will do: the bytes are what the pin names, whatever S3 holds
        now. Only this key's rows count: a blob that only another key
        references is that key's, not a proof of what this key held. A blob
        failing its check is not served; the caller's normal path handles it.
        """
        rows = self._rows
        if version_id:
            tags: tuple[str, ...] = ("v:" + version_id,)
        else:
            # cur first: the usual case, and entries committed before dig rows existed
            cur = rows.get(("cur", bucket, key)) or (
                None if memory_only else self._get(("cur", bucket, key))
            )
            dig = rows.get(("dig", bucket, key, sha256)) or (
                None if memory_only else self._get(("dig", bucket, key, sha256))
            )
            tags = tuple(row[0] for row in (cur, dig) if row)
        for tag in tags:
            k = ("obj", bucket, key, tag)
            entry = rows.get(k) or (None if memory_only else self._get(k))
            if entry is None or entry.sha256 != sha256:
                continue
            expected = rows.get(("blob", sha256)) or (
                None if memory_only else self._get(("blob", sha256))
            )
            path = self._paths.get(sha256) or self.blob_path(sha256)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if expected != (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino):
                continue
            last_access, pinned_until = self._pins.get(k) or (entry.last_access, entry.pinned_until)
            return Hit(entry, path, 0.0, last_access, pinned_until)
        return None

    def totals(self) -> tuple[int, int]:
        """(entries, bytes of unique blobs) in the index; counted by recovery on first use."""
        self._ensure_recovered()
        with self._lock:
            assert self._totals is not None
            return self._totals[0], self._totals[1]

    def _adjust(self, *, entries: int = 0, size: int = 0) -> None:
        with self._lock:
            if self._totals is not None:
                self._totals[0] += entries
                self._totals[1] += size

    # -- writes -----------------------------------------------------------------

    def mark_checked(
        self, bucket: str, key: str, version_id: str | None = None, *, now: float | None = None
    ) -> None:
        """Record that S3 still holds what ``cur`` (or the given version's row) points at.

        For a version (only ``"null"`` is ever re-checked) the time is kept in
        memory alone: after a restart it is checked once more, which is safe.
        """
        if version_id is not None:
            self._checked[("obj", bucket, key, "v:" + version_id)] = (
                time.time() if now is None else now
            )
            return
        cur = self._get(("cur", bucket, key))
        if cur is not None:
            self._set(("cur", bucket, key), (cur[0], time.time() if now is None else now))

    def touch(self, bucket: str, key: str, entry: Entry, *, pinned_until: float) -> float | None:
        """Pin a looked-up entry and note the access (in memory until the next flush).

        Returns the pin, or None if the entry or its blob went away since the
        lookup (evicted or quarantined): the caller must not hand out the
        path then. Pinning and eviction share the lock, so once this returns
        a pin the blob stays until the pin expires.
        """
        k = ("obj", bucket, key, self._tag(entry.etag, entry.version_id))
        fault = self.pin_fault
        if fault is not None:
            raise type(fault)(fault.message, detail=fault.detail)
        with self._lock:
            if self._rows.get(k) is None or ("blob", entry.sha256) not in self._rows:
                return None
            pin = max(pinned_until, entry.pinned_until, self._pins.get(k, (0.0, 0.0))[1])
            self._pins[k] = (time.time(), pin)
            self._dirty.add(k)
        return pin

    # -- lifecycle: quarantine, recovery, eviction, verification ----------------

    def quarantine(self, sha256: str, *, reason: str) -> bool:
        """Take a blob out of service: its row goes, its file moves to quarantine/.

        Returns True if a file was moved. Rows that name the blob read as
        misses from now on, so it is fetched again, never served.
        """
        with self._lock:
            fp = self._get(("blob", sha256))
            if fp is not None:
                self._delete(("blob", sha256))
                self._adjust(size=-int(fp[0]))
            path = self.blob_path(sha256)
            dest = self.quarantine_dir / f"{sha256}.{time.time_ns()}"
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                return False
            log.warning("blob quarantined", sha256=sha256, reason=reason, moved_to=str(dest))
            return True

    def quarantine_usage(self) -> tuple[int, int]:
        """(files, bytes) in quarantine/."""
        files = size = 0
        for _mtime, n, _path in self._quarantined():
            files += 1
            size += n
        return files, size

    def _quarantined(self) -> list[tuple[float, int, Path]]:
        found: list[tuple[float, int, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for child in self.quarantine_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    st = child.lstat()
                    found.append((st.st_mtime, st.st_size, child))
        return found

    def prune_quarantine(
        self, *, max_age_s: float, max_bytes: int, now: float | None = None
    ) -> int:
        """Delete quarantined files past ``max_age_s``, then the oldest over ``max_bytes``."""
        now = time.time() if now is None else now
        files = sorted(self._quarantined(), key=lambda f: f[0])
        total = sum(f[1] for f in files)
        removed = 0
        for mtime, size, path in files:
            if now - mtime <= max_age_s and total <= max_bytes:
                break  # oldest first: the rest are younger and fit
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            log.info("quarantine pruned", removed=removed, bytes_left=total)
        return removed

    def check_blob(self, sha256: str) -> bool:
        """Re-check one blob against its row (the watchdog's callback); True if it was bad."""
        return self._check_blob(sha256, reason="modified under the cache") != "ok"

    def _check_blob(self, sha256: str, *, reason: str) -> str:
        """ "ok", "missing" (row dropped) or "quarantined", decided under the lock."""
        with self._lock:
            fp = self._get(("blob", sha256))
            if fp is None:
                return "ok"  # not ours (yet), or already handled
            try:
                st = os.stat(self.blob_path(sha256))
            except FileNotFoundError:
                self._delete(("blob", sha256))
                self._adjust(size=-int(fp[0]))
                log.warning("blob deleted under the cache", sha256=sha256)
                return "missing"
            if fp == _fingerprint(st):
                return "ok"
            self.quarantine(sha256, reason=reason)
            return "quarantined"

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

    def recover(self) -> RecoveryReport:
        """Bring index and blobs back into agreement after a crash; idempotent.

        Drops rows whose blob is missing or changed (changed blobs are
        quarantined), deletes blob files nothing references, and counts the
        totals that eviction needs. Safe while the daemon serves: every
        decision is re-checked under the store's lock.
        """
        with self._recovery_lock, self._exclusive():
            if self.recovered.is_set() and self.recovery is not None:
                return self.recovery
            started = time.monotonic()
            report = RecoveryReport(removed_temps=self.removed_temps)
            rows = self._load_all()
            for k in rows:
                if k[0] == "blob":
                    # re-checked under the lock: a resolve may have replaced it meanwhile
                    outcome = self._check_blob(k[1], reason="changed while down")
                    report.dropped_rows += outcome == "missing"
                    report.quarantined += outcome == "quarantined"
            report.dropped_rows += self._drop_dangling()
            report.deleted_blobs = self._delete_unreferenced()
            with self._lock:
                entries = sum(1 for k in self._rows if k[0] == "obj")
                size = sum(int(v[0]) for k, v in self._rows.items() if k[0] == "blob")
                self._totals = [entries, size]
            report.entries, report.bytes = entries, size
            report.seconds = round(time.monotonic() - started, 3)
            self.recovery = report
            self.recovered.set()
            return report

    def _drop_dangling(self) -> int:
        """Remove obj rows whose blob row is gone, and cur rows whose obj row is gone."""
        dropped = 0
        with self._lock:
            for k in [k for k in self._rows if k[0] == "obj"]:
                if ("blob", self._rows[k].sha256) not in self._rows:
                    self._delete(k)
                    self._adjust(entries=-1)
                    dropped += 1
            for k in [k for k in self._rows if k[0] in ("cur", "dig")]:
                if ("obj", k[1], k[2], self._rows[k][0]) not in self._rows:
                    self._delete(k)
                    dropped += k[0] == "cur"  # dig rows are secondary: not reported
        return dropped

    def _referenced(self) -> set[str]:
        with self._lock:
            return {v.sha256 for k, v in self._rows.items() if k[0] == "obj"}

    def _delete_unreferenced(self) -> int:
        """Delete blob files (and blob rows) that no obj row names.

        The directory is listed without the lock; each candidate is then
        re-checked under it, against references counted again, so a blob a
        concurrent commit just published is never taken.
        """
        seen = self._referenced()
        candidates = [
            path
            for sub in self.blobs.iterdir()
            if sub.is_dir()
            for path in sub.iterdir()
            if path.name not in seen
        ]
        if not candidates:
            return 0
        deleted = 0
        with self._lock:
            referenced = self._referenced()
            for path in candidates:
                if path.name in referenced:
                    continue
                if ("blob", path.name) in self._rows:
                    self._delete(("blob", path.name))
                path.unlink(missing_ok=True)
                deleted += 1
        return deleted

    def _ensure_recovered(self) -> None:
        if not self.recovered.is_set():
            self.recover()

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

    def verify(self, stop: threading.Event | None = None) -> VerifyReport:
        """Re-hash every blob; quarantine those whose bytes do not match their name.

        ``stop`` set (the daemon is shutting down) ends it early with ``Unavailable``.
        """
        with self._exclusive():
            return self._verify(stop)

    def _verify(self, stop: threading.Event | None = None) -> VerifyReport:
        started = time.monotonic()
        report = VerifyReport()
        self._load_all()
        for sub in sorted(self.blobs.iterdir()):
            for path in sorted(sub.iterdir()) if sub.is_dir() else ():
                if stop is not None and stop.is_set():
                    raise Unavailable("verify stopped: assetd is shutting down; run it again")
                sha = hashlib.sha256()
                try:
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            sha.update(chunk)
                except FileNotFoundError:
                    continue  # evicted while we looked
                report.checked += 1
                report.bytes += path.stat().st_size if path.exists() else 0
                if sha.hexdigest() != path.name:
                    report.mismatched.append(path.name)
                    if not self.quarantine(path.name, reason="content does not match its name"):
                        continue
        report.dropped_rows = self._drop_dangling()
        report.seconds = round(time.monotonic() - started, 3)
        return report

    def discard_blob(self, sha256: str) -> None:
        """Delete a blob; rows that name it read as misses from now on."""
        with self._lock:
            fp = self._get(("blob", sha256))
            self._delete(("blob", sha256))
            self.blob_path(sha256).unlink(missing_ok=True)
            if fp:
                self._adjust(size=-int(fp[0]))

    def commit(
        self,
        staged: StagedBlob,
        *,
        bucket: str,
        key: str,
        sha256: str,
        size: int,
        etag: str,
        version_id: str | None,
        requested_version: str | None,
        pinned_until: float,
    ) -> tuple[Entry, Path]:
        """Publish a verified download; the index row written last is the commit point."""
        path = self.blob_path(sha256)
        now = time.time()
        entry = Entry(sha256, size, etag, version_id, now, now, pinned_until)
        tag = self._tag(etag, version_id)
        obj_key = ("obj", bucket, key, tag)
        # fsync before the lock: hits take it to pin, and must not wait on a disk flush
        if not self._blob_ok(sha256):
            staged.seal()
        # one publisher at a time, so two keys with the same bytes cannot
        # record each other's inode as the fingerprint
        with self._lock:
            old_fp = self._get(("blob", sha256))
            had_blob = self._blob_ok(sha256)
            new_entry = self._get(obj_key) is None
            fingerprint = self._publish(staged, sha256, path, exists=had_blob)
            try:
                with self.index.transact():
                    self._set(("blob", sha256), fingerprint)
                    self._pins.pop(obj_key, None)
                    self._set(obj_key, entry)
                    if not requested_version:  # a pinned version never moves what others see
                        self._set(("cur", bucket, key), (tag, now))
                    self._set(("dig", bucket, key, sha256), (tag,))
            except (sqlite3.Error, OSError) as exc:
                # the memory rows went in with the failed transaction: take them back out
                for k in (
                    ("blob", sha256),
                    obj_key,
                    ("cur", bucket, key),
                    ("dig", bucket, key, sha256),
                ):
                    self._rows.pop(k, None)
                    self._dirty.discard(k)
                raise _index_error(exc, "write index row") from exc
            replaced = int(old_fp[0]) if old_fp is not None and not had_blob else 0
            self._adjust(entries=int(new_entry), size=0 if had_blob else size - replaced)
        return entry, path

    @staticmethod
    def _publish(staged: StagedBlob, sha256: str, path: Path, *, exists: bool) -> Fingerprint:
        if exists:
            return _fingerprint(os.stat(path))  # identical content is stored once
        if not staged.sealed:
            staged.seal()  # raced with a delete of the copy we meant to share
        try:
            path.parent.mkdir(exist_ok=True)
            # No directory fsync: if power loss undoes the rename but keeps the
            # row, the blob reads as missing, which is a miss, never bad bytes.
            os.rename(staged.path, path)
            return _fingerprint(os.stat(path))
        except OSError as exc:
            raise _disk_error(exc, "publish blob") from exc
