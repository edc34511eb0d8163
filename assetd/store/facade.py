"""The :class:`Store` itself: opening the cache, lookups, pins, and committing downloads."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache

from assetd.store.blobs import StagedBlob, _disk_error, _fingerprint
from assetd.store.eviction import Eviction
from assetd.store.index import _MISSING, Entry, _index_error


@dataclass(frozen=True, slots=True)
class Hit:
    entry: Entry  # as committed; access time and pin are below, current as of the lookup
    path: Path
    checked_at: float
    last_access: float
    pinned_until: float


class Store(Eviction):
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

    Built in layers, each its own module and base class, each using only
    those below it: blob files, ownership, index rows, quarantine,
    recovery, eviction; this class adds the hit path and commit.
    """

    _checked: dict[tuple[str, ...], float]  # last S3 check of a version row

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
        self._lock_fd = self._take_lock() if lock else None
        try:
            self._staging = set()
            self.removed_temps = self._clear_tmp(owner=lock)
            self._headroom = self.root / "headroom"
            self._headroom_ok = self._make_headroom()
            self.pin_fault = None
            self.index = diskcache.Cache(str(self.root / "index"), eviction_policy="none")
        except BaseException:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise
        self._lock = threading.RLock()
        self._rows = {}
        self._dirty = set()
        self._pins = {}
        self._paths = {}
        self._checked = {}
        self._totals = None
        self._reserved = 0
        self._recovery_lock = threading.Lock()
        self.recovered = threading.Event()
        self.recovery = None
        self._pass_mutex = threading.Lock()
        self._passes = 0
        self._pass_fd = -1

    def close(self) -> None:
        try:
            self.flush()
            self.index.close()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the last fd releases the flock
                self._lock_fd = None

    @staticmethod
    def _tag(etag: str, version_id: str | None) -> str:
        return f"v:{version_id}" if version_id else f"e:{etag}"

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
            keys = (("blob", sha256), obj_key, ("cur", bucket, key), ("dig", bucket, key, sha256))
            before = [(k, self._rows.get(k, _MISSING), k in self._dirty) for k in keys]
            old_pin = self._pins.pop(obj_key, None)
            try:
                with self.index.transact():
                    self._set(("blob", sha256), fingerprint)
                    self._set(obj_key, entry)
                    if not requested_version:  # a pinned version never moves what others see
                        self._set(("cur", bucket, key), (tag, now))
                    self._set(("dig", bucket, key, sha256), (tag,))
            except (sqlite3.Error, OSError) as exc:
                # the memory rows went in with the failed transaction: put back what was
                # there, the pin a sandbox may rely on included
                for k, value, dirty in before:
                    if value is _MISSING:
                        self._rows.pop(k, None)
                    else:
                        self._rows[k] = value
                    if not dirty:
                        self._dirty.discard(k)
                if old_pin is not None:
                    self._pins[obj_key] = old_pin
                raise _index_error(exc, "write index row") from exc
            replaced = int(old_fp[0]) if old_fp is not None and not had_blob else 0
            self._adjust(entries=int(new_entry), size=0 if had_blob else size - replaced)
        return entry, path
