"""The on-disk cache: content-addressed blobs plus a diskcache index.

Layout under the cache dir (DESIGN.md "Cache")::

    blobs/sha256/<2 hex>/<64 hex>   mode 0444, the bytes bind-mounted into sandboxes
    tmp/                            staged downloads, blob-<pid>-<random>.part
    quarantine/                     blobs whose bytes changed under us, kept for inspection
    index/                          diskcache (SQLite) rows
    lock                            flock held by the one process that owns the cache
    headroom                        1 MiB kept allocated so pins can be written on a full disk

Commit order, as in diskcache: write the blob under a unique temp name,
fsync, rename into place, and only then write the index row. The row is
the commit point; a crash before it leaves at worst an unreferenced blob,
never a row pointing at missing or partial bytes.
Readers treat a missing or changed blob as a miss.

Modules, lowest layer first: ``blobs`` (staged and published files),
``lock`` (ownership, ``tmp/`` sweeping), ``index`` (rows, pins flushed),
``quarantine``, ``recovery`` (and verify), ``eviction``, ``facade``
(:class:`Store`: lookups, pins, commit); ``reports`` for what passes return.
"""

from assetd.store.blobs import Fingerprint, StagedBlob
from assetd.store.facade import Hit, Store
from assetd.store.index import HEADROOM_BYTES, Entry
from assetd.store.lock import TEMP_GRACE_S, CacheLocked
from assetd.store.reports import EvictionReport, RecoveryReport, VerifyReport

__all__ = [
    "HEADROOM_BYTES",
    "TEMP_GRACE_S",
    "CacheLocked",
    "Entry",
    "EvictionReport",
    "Fingerprint",
    "Hit",
    "RecoveryReport",
    "StagedBlob",
    "Store",
    "VerifyReport",
]
