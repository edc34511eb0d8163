"""Blobs taken out of service: quarantined, re-checked against their row, or discarded."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from assetd.log import get_logger
from assetd.store.blobs import _fingerprint
from assetd.store.index import RowIndex

log = get_logger("assetd.store")


class Quarantine(RowIndex):
    """The store's layer of quarantine: ``quarantine/`` and single-blob checks."""

    quarantine_dir: Path

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

    def discard_blob(self, sha256: str) -> None:
        """Delete a blob; rows that name it read as misses from now on."""
        with self._lock:
            fp = self._get(("blob", sha256))
            self._delete(("blob", sha256))
            self.blob_path(sha256).unlink(missing_ok=True)
            if fp:
                self._adjust(size=-int(fp[0]))
