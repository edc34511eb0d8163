"""Ownership of the cache: the ``lock`` file, and which temp files a store may remove.

The daemon, and ``gc``/``verify`` when no daemon runs, open the store with
``lock=True``: an exclusive ``flock`` on ``lock`` for as long as the store
is open, so two processes can never both act as the owner (a second one
gets :class:`CacheLocked`). Temp files carry their process's pid; opening a
store (and the daemon's housekeeping) removes only those of processes that
are gone or that were not written to for ``TEMP_GRACE_S``, so it never
takes a live download's file. Passes that delete files run only under the
lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from assetd.log import get_logger
from assetd.store.blobs import BlobFiles, _disk_error

log = get_logger("assetd.store")
TEMP_GRACE_S = 600.0  # a temp file of a live pid untouched this long is a leftover


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


class Ownership(BlobFiles):
    """The store's layer of ownership: the cache lock and sweeping ``tmp/``."""

    root: Path
    _lock_fd: int | None
    _pass_mutex: threading.Lock  # guards the two below (non-owners only)
    _passes: int  # destructive passes running in this store
    _pass_fd: int  # the lock file's fd while any of them runs

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

        Kept: this store's own downloads in progress; files of this or another
        live process written to within ``TEMP_GRACE_S`` (a pid can be reused, so
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
            # our own files too: a download's file exists a moment before it is registered
            if pid is not None and (pid == me or _alive(pid)):
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
