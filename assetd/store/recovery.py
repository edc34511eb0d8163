"""Recovery and verify: bring rows and blob files back into agreement, re-hash blobs."""

from __future__ import annotations

import hashlib
import threading
import time

from assetd.errors import Unavailable
from assetd.store.quarantine import Quarantine
from assetd.store.reports import RecoveryReport, VerifyReport


class Recovery(Quarantine):
    """The store's layer of whole-cache checks: recovery (and the totals) and verify."""

    _recovery_lock: threading.Lock
    recovered: threading.Event  # every row is in memory and checked
    recovery: RecoveryReport | None
    removed_temps: int

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
                sha, size = hashlib.sha256(), 0
                try:
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            sha.update(chunk)
                            size += len(chunk)
                except FileNotFoundError:
                    continue  # evicted while we looked
                report.checked += 1
                report.bytes += size  # no stat after: an eviction meanwhile is no error
                if sha.hexdigest() != path.name:
                    report.mismatched.append(path.name)
                    if not self.quarantine(path.name, reason="content does not match its name"):
                        continue
        report.dropped_rows = self._drop_dangling()
        report.seconds = round(time.monotonic() - started, 3)
        return report
