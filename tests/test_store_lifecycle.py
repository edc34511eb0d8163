"""Unit tests for the store's lifecycle: recovery, eviction, reservations, quarantine, verify."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import errors
from assetd.store import Store, eviction, facade, lock, quarantine, recovery
from assetd.store.blobs import _fingerprint
from tests.support.cache import commit_bytes

FAR = 1e12  # a pin that never runs out during a test


class Clock:
    """Stands in for the ``time`` module inside the assetd.store modules, so LRU order is exact."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    @staticmethod
    def time_ns() -> int:
        return time.time_ns()

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The cache directory the tests open stores on."""
    return tmp_path / "cache"


@pytest.fixture
def store(root: Path) -> Iterator[Store]:
    """A Store in a fresh temp cache directory."""
    s = Store(root)
    yield s
    s.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A controllable clock for access times and pins."""
    fake = Clock()
    for module in (lock, quarantine, recovery, eviction, facade):  # every one that reads time
        monkeypatch.setattr(module, "time", fake)
    return fake


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_commit = commit_bytes


def _data(i: int, size: int = 100) -> bytes:
    """Distinct bytes per i."""
    return bytes([i % 256]) * size


def _tamper(path: Path, *, keep_mtime: bool = False) -> bytes:
    """Rewrite a blob with different bytes of the same length, as a careless admin would."""
    before = os.stat(path)
    os.chmod(path, 0o644)
    new = bytes(b ^ 0xFF for b in path.read_bytes())
    path.write_bytes(new)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return new


def _blob_files(store: Store) -> list[Path]:
    return sorted(p for p in store.blobs.rglob("*") if p.is_file())


def _quarantined(store: Store) -> list[Path]:
    return sorted(store.quarantine_dir.iterdir())


def _index_rows(store: Store, kind: str) -> dict[tuple[str, ...], Any]:
    return {k: store.index.get(k) for k in store.index.iterkeys() if k[0] == kind}


def _assert_consistent(store: Store) -> None:
    """Every obj row names a blob row, whose file exists and hashes to its name; totals agree."""
    objs = _index_rows(store, "obj")
    blobs = _index_rows(store, "blob")
    for raw in objs.values():
        assert ("blob", raw["sha256"]) in blobs
    for (_, sha), fp in blobs.items():
        path = store.blob_path(sha)
        assert sha == _sha(path.read_bytes())
        assert fp[0] == path.stat().st_size
    for (_, bucket, key), raw in _index_rows(store, "cur").items():
        assert ("obj", bucket, key, raw["tag"]) in objs
    assert (len(objs), sum(fp[0] for fp in blobs.values())) == store.totals()


def _reopen(store: Store) -> Store:
    """Close a store and open a new one on the same directory, as a restart does."""
    store.close()
    return Store(store.root)


# -- recovery -----------------------------------------------------------------------------------


def test_recover_drops_rows_of_deleted_blob(root: Path) -> None:
    """A blob deleted while down loses its blob, obj and cur rows; other entries survive."""
    s1 = Store(root)
    _, gone = _commit(s1, b"deleted while down", key="gone")
    _commit(s1, b"kept", key="kept")
    gone.unlink()
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 3 == report.dropped_rows  # ("blob", sha), ("obj", ...), ("cur", ...)
        assert 0 == report.quarantined
        assert 0 == report.deleted_blobs
        assert (1, len(b"kept")) == (report.entries, report.bytes)
        assert None is s2.index.get(("blob", _sha(b"deleted while down")))
        assert None is s2.lookup("bucket", "gone", None)
        assert s2.lookup("bucket", "kept", None) is not None
        _assert_consistent(s2)
    finally:
        s2.close()


def test_recover_drops_every_key_of_a_deleted_shared_blob(root: Path) -> None:
    """When a blob two keys share is deleted, both keys' rows go."""
    s1 = Store(root)
    _, path = _commit(s1, b"shared", key="a")
    _commit(s1, b"shared", key="b")
    path.unlink()
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 5 == report.dropped_rows  # one blob row, two obj rows, two cur rows
        assert {} == _index_rows(s2, "obj")
        assert {} == _index_rows(s2, "cur")
        assert (0, 0) == s2.totals()
    finally:
        s2.close()


def test_recover_quarantines_modified_blob(root: Path) -> None:
    """A blob rewritten while down (same length, mtime restored) is quarantined, rows dropped."""
    s1 = Store(root)
    entry, path = _commit(s1, b"original bytes", key="bad")
    _commit(s1, b"fine", key="good")
    time.sleep(0.01)
    tampered = _tamper(path, keep_mtime=True)
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 1 == report.quarantined
        assert 2 == report.dropped_rows  # the obj and cur rows; the blob row went with the file
        assert not path.exists()
        moved = _quarantined(s2)
        assert 1 == len(moved)
        assert moved[0].name.startswith(entry.sha256 + ".")
        assert tampered == moved[0].read_bytes()
        assert None is s2.lookup("bucket", "bad", None)
        assert s2.lookup("bucket", "good", None) is not None
        _assert_consistent(s2)
    finally:
        s2.close()


def test_recover_deletes_unreferenced_blob_file(root: Path) -> None:
    """A blob file no row names (crash between rename and row write) is deleted."""
    s1 = Store(root)
    _commit(s1, b"referenced", key="k")
    orphan = _data(7)
    orphan_path = s1.blob_path(_sha(orphan))
    orphan_path.parent.mkdir(exist_ok=True)
    orphan_path.write_bytes(orphan)
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 1 == report.deleted_blobs
        assert 0 == report.dropped_rows
        assert not orphan_path.exists()
        assert [s2.blob_path(_sha(b"referenced"))] == _blob_files(s2)
        _assert_consistent(s2)
    finally:
        s2.close()


def test_recover_deletes_blob_with_row_but_no_entry(root: Path) -> None:
    """A blob row and file with no obj row naming them are both removed."""
    s1 = Store(root)
    _, path = _commit(s1, b"lonely", key="k")
    s1.index.delete(("obj", "bucket", "k", 'e:"k"'))
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 1 == report.deleted_blobs
        assert 1 == report.dropped_rows  # the cur row that named the missing obj row
        assert not path.exists()
        assert {} == _index_rows(s2, "blob")
        assert (0, 0) == s2.totals()
    finally:
        s2.close()


def test_recover_counts_removed_temps(root: Path) -> None:
    """Leftovers in tmp/ are removed on open and reported by recover()."""
    Store(root).close()
    (root / "tmp" / "blob-1.part").write_bytes(b"half a download")
    (root / "tmp" / "stray-dir").mkdir()
    s = Store(root)
    try:
        assert [] == sorted((root / "tmp").iterdir())
        assert 2 == s.recover().removed_temps
    finally:
        s.close()


def test_recover_drops_dangling_obj_and_cur_rows(root: Path) -> None:
    """An obj row without its blob row, and a cur row without its obj row, are dropped."""
    s1 = Store(root)
    entry, path = _commit(s1, b"row lost", key="noblob")
    _commit(s1, b"fine", key="fine")
    s1.index.delete(("blob", entry.sha256))
    s1.index.set(("cur", "bucket", "ghost"), {"tag": 'e:"ghost"', "checked_at": 1.0})
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        # obj + cur of "noblob", and the ghost cur row
        assert 3 == report.dropped_rows
        assert 1 == report.deleted_blobs  # the file nothing names any more
        assert not path.exists()
        assert None is s2.index.get(("cur", "bucket", "ghost"))
        assert None is s2.lookup("bucket", "noblob", None)
        assert s2.lookup("bucket", "fine", None) is not None
        _assert_consistent(s2)
    finally:
        s2.close()


def test_recover_after_mixed_crash_is_consistent_and_idempotent(root: Path) -> None:
    """After every kind of damage at once, recovery leaves a consistent index, and is idempotent."""
    s1 = Store(root)
    _, deleted = _commit(s1, _data(1), key="deleted")
    _, modified = _commit(s1, _data(2), key="modified")
    _commit(s1, _data(3), key="shared-a")
    _commit(s1, _data(3), key="shared-b")
    _commit(s1, _data(4, 50), key="small")
    orphan = s1.blob_path(_sha(_data(5)))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(_data(5))
    (root / "tmp" / "blob-x.part").write_bytes(b"partial")
    deleted.unlink()
    _tamper(modified)
    s2 = _reopen(s1)
    try:
        report = s2.recover()
        assert 1 == report.removed_temps
        assert 1 == report.quarantined
        assert 1 == report.deleted_blobs
        assert 3 + 2 == report.dropped_rows
        assert (3, 150) == (report.entries, report.bytes)
        _assert_consistent(s2)
        assert report == s2.recover()
    finally:
        s2.close()
    s3 = Store(root)
    try:
        again = s3.recover()
        assert (0, 0, 0, 0) == (
            again.removed_temps,
            again.dropped_rows,
            again.quarantined,
            again.deleted_blobs,
        )
        assert (3, 150) == (again.entries, again.bytes)
        for key in ("shared-a", "shared-b", "small"):
            assert s3.lookup("bucket", key, None) is not None
        _assert_consistent(s3)
    finally:
        s3.close()


def test_recover_keeps_blob_recommitted_during_recovery(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob fetched again while recovery runs beside serving is not quarantined by it."""
    data = b"tampered while down, fetched again after READY"
    s1 = Store(root)
    _, path = _commit(s1, data, key="k")
    _tamper(path)
    s2 = _reopen(s1)
    load_all = s2._load_all

    def snapshot_then_serve() -> dict[tuple[str, ...], Any]:
        rows = load_all()
        # a request served beside recovery: the hit path drops the bad blob, the miss refetches
        assert None is s2.lookup("bucket", "k", None)
        _commit(s2, data, key="k")
        return rows

    monkeypatch.setattr(s2, "_load_all", snapshot_then_serve)
    try:
        s2.recover()
        hit = s2.lookup("bucket", "k", None)
        assert hit is not None
        assert data == hit.path.read_bytes()
    finally:
        s2.close()


# -- eviction -----------------------------------------------------------------------------------


def _fill(store: Store, clock: Clock, n: int, size: int = 100, **pins: float) -> list[str]:
    """Commit keys k0..k{n-1} of ``size`` distinct bytes at times 1, 2, ...; returns the keys."""
    keys = []
    for i in range(n):
        clock.now = float(i + 1)
        key = f"k{i}"
        _commit(store, _data(i, size), key=key, pinned_until=pins.get(key, 0.0))
        keys.append(key)
    return keys


def _present(store: Store, keys: list[str]) -> list[str]:
    return [k for k in keys if store.lookup("bucket", k, None) is not None]


def test_evict_least_recently_used_first(store: Store, clock: Clock) -> None:
    """Over max_bytes, the least recently accessed entries go first; a touch makes one recent."""
    keys = _fill(store, clock, 5)
    clock.now = 10.0
    hit = store.lookup("bucket", "k0", None)
    assert hit is not None
    store.touch("bucket", "k0", hit.entry, pinned_until=0.0)
    report = store.evict(max_bytes=350, min_free_bytes=0, now=20.0)
    assert (2, 2, 200, 300) == (
        report.removed_entries,
        report.removed_blobs,
        report.freed_bytes,
        report.bytes_after,
    )
    assert not report.full
    assert ["k0", "k3", "k4"] == _present(store, keys)
    assert not store.blob_path(_sha(_data(1))).exists()
    assert not store.blob_path(_sha(_data(2))).exists()
    _assert_consistent(store)


def test_evict_goes_down_to_low_water(store: Store, clock: Clock) -> None:
    """Once triggered, eviction goes to 90% of max_bytes, not just under it."""
    keys = _fill(store, clock, 10, size=10)
    report = store.evict(max_bytes=95, min_free_bytes=0, now=20.0)
    assert 2 == report.removed_entries  # 100 -> 80 <= 85.5; stopping at 90 <= 95 would be one
    assert 80 == report.bytes_after
    assert keys[2:] == _present(store, keys)


def test_evict_under_limits_does_nothing(store: Store, clock: Clock) -> None:
    """At or under max_bytes (and with free space) nothing is evicted."""
    keys = _fill(store, clock, 5)
    report = store.evict(max_bytes=500, min_free_bytes=0, now=20.0)
    assert 0 == report.removed_entries
    assert not report.full
    assert keys == _present(store, keys)


def test_evict_never_takes_pinned(store: Store, clock: Clock) -> None:
    """Entries pinned past now are skipped, however old; a pin that has ended is not."""
    keys = _fill(store, clock, 5, k0=FAR, k1=19.0)
    hit = store.lookup("bucket", "k2", None)
    assert hit is not None
    store.touch("bucket", "k2", hit.entry, pinned_until=FAR)  # pinned by a later resolve
    report = store.evict(max_bytes=350, min_free_bytes=0, now=20.0)
    assert 2 == report.removed_entries
    assert ["k0", "k2", "k4"] == _present(store, keys)


def test_evict_shared_blob_only_when_unreferenced(store: Store, clock: Clock) -> None:
    """A blob two keys share survives the first entry's eviction; the other key still hits."""
    clock.now = 1.0
    _commit(store, _data(9), key="a")
    clock.now = 2.0
    _commit(store, _data(9), key="b", pinned_until=50.0)
    clock.now = 3.0
    _commit(store, _data(1), key="c")
    clock.now = 4.0
    _commit(store, _data(2), key="d")
    shared = store.blob_path(_sha(_data(9)))
    first = store.evict(max_bytes=250, min_free_bytes=0, now=10.0)
    assert (2, 1, 100) == (first.removed_entries, first.removed_blobs, first.freed_bytes)
    assert ["b", "d"] == _present(store, ["a", "b", "c", "d"])
    assert shared.exists()
    hit = store.lookup("bucket", "b", None)
    assert hit is not None
    assert _data(9) == hit.path.read_bytes()
    second = store.evict(max_bytes=150, min_free_bytes=0, now=100.0)  # b's pin has ended
    assert (1, 1, 100) == (second.removed_entries, second.removed_blobs, second.freed_bytes)
    assert not shared.exists()
    assert ["d"] == _present(store, ["a", "b", "c", "d"])
    _assert_consistent(store)


def test_evict_all_pinned_reports_full(store: Store, clock: Clock) -> None:
    """When everything is pinned, nothing is deleted and the report says full."""
    keys = _fill(store, clock, 4, k0=FAR, k1=FAR, k2=FAR, k3=FAR)
    files = _blob_files(store)
    report = store.evict(max_bytes=250, min_free_bytes=0, now=20.0)
    assert report.full
    assert (0, 0, 0, 400) == (
        report.removed_entries,
        report.removed_blobs,
        report.freed_bytes,
        report.bytes_after,
    )
    assert files == _blob_files(store)
    assert keys == _present(store, keys)


def test_evict_for_min_free_bytes(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk under min_free_bytes triggers eviction even far under max_bytes."""
    keys = _fill(store, clock, 5)
    capacity = 700  # a tiny disk: free space is what the blobs leave

    def free_bytes() -> int:
        return capacity - sum(p.stat().st_size for p in _blob_files(store))

    monkeypatch.setattr(store, "free_bytes", free_bytes)
    assert 200 == store.free_bytes()
    report = store.evict(max_bytes=1 << 30, min_free_bytes=350, now=20.0)
    assert 2 == report.removed_entries
    assert 400 == report.free_after
    assert not report.full
    assert keys[2:] == _present(store, keys)


def test_evict_removes_rows_before_files(
    store: Store, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a blob file is deleted, no index row names it any more (rows are the commit point)."""
    keys = _fill(store, clock, 5)
    seen: list[tuple[str, bool, bool]] = []
    real_unlink = Path.unlink

    def spy(self: Path, missing_ok: bool = False) -> None:
        if self.parent.parent == store.blobs:
            blob_row = store.index.get(("blob", self.name)) is not None
            obj_row = any(raw["sha256"] == self.name for raw in _index_rows(store, "obj").values())
            seen.append((self.name, blob_row, obj_row))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", spy)
    report = store.evict(max_bytes=350, min_free_bytes=0, now=20.0)
    assert 2 == report.removed_blobs
    assert [(_sha(_data(0)), False, False), (_sha(_data(1)), False, False)] == seen
    assert keys[2:] == _present(store, keys)
    _assert_consistent(store)


# -- reservations -------------------------------------------------------------------------------


def test_reserve_all_pinned_raises_cache_full(store: Store, clock: Clock) -> None:
    """A reservation that cannot fit because everything is pinned raises CacheFull."""
    keys = _fill(store, clock, 3, k0=FAR, k1=FAR, k2=FAR)
    with (
        pytest.raises(errors.CacheFull) as info,
        store.reserve(100, max_bytes=350, min_free_bytes=0),
    ):
        pytest.fail("reserve() yielded with no room")
    assert info.value.retryable
    assert "cache_full" == info.value.code
    assert keys == _present(store, keys)


def test_reserve_evicts_unpinned_to_make_room(store: Store, clock: Clock) -> None:
    """A reservation evicts LRU unpinned entries until the download fits."""
    keys = _fill(store, clock, 3)
    with store.reserve(150, max_bytes=400, min_free_bytes=0):
        assert keys[1:] == _present(store, keys)  # 300 + 150 > 400: down to 360 -> 200 + 150
        assert (2, 200) == store.totals()


def test_reserve_counts_in_flight_bytes(store: Store) -> None:
    """Bytes reserved by a download in flight count against a second reservation."""
    with store.reserve(600, max_bytes=1000, min_free_bytes=0):
        with (
            pytest.raises(errors.CacheFull),
            store.reserve(600, max_bytes=1000, min_free_bytes=0),
        ):
            pytest.fail("two reservations exceeding max_bytes both yielded")
        with store.reserve(400, max_bytes=1000, min_free_bytes=0):
            pass  # exactly at the limit fits
    with store.reserve(600, max_bytes=1000, min_free_bytes=0):
        pass  # released after exit


def test_reserve_in_flight_bytes_trigger_eviction(store: Store, clock: Clock) -> None:
    """An in-flight reservation makes a later one evict what alone would have fitted."""
    keys = _fill(store, clock, 3)
    with store.reserve(700, max_bytes=1000, min_free_bytes=0):
        assert keys == _present(store, keys)
        with store.reserve(100, max_bytes=1000, min_free_bytes=0):
            assert keys[1:] == _present(store, keys)


def test_reserve_released_on_exception(store: Store) -> None:
    """A download that fails inside its reservation gives the bytes back."""
    with pytest.raises(RuntimeError), store.reserve(600, max_bytes=1000, min_free_bytes=0):
        raise RuntimeError("download failed")
    with store.reserve(1000, max_bytes=1000, min_free_bytes=0):
        pass


def test_reserve_larger_than_cache_evicts_nothing(store: Store, clock: Clock) -> None:
    """A download that could never fit is refused without emptying the cache."""
    keys = _fill(store, clock, 3)
    with pytest.raises(errors.CacheFull), store.reserve(2000, max_bytes=1000, min_free_bytes=0):
        pytest.fail("a reservation larger than the cache yielded")
    assert keys == _present(store, keys)


# -- quarantine and check_blob ------------------------------------------------------------------


def test_check_blob_intact(store: Store) -> None:
    """An intact blob checks fine: False, nothing moves, the key still hits."""
    entry, path = _commit(store, b"intact")
    assert not store.check_blob(entry.sha256)
    assert path.exists()
    assert [] == _quarantined(store)
    assert store.lookup("bucket", "k", None) is not None


def test_check_blob_unknown_sha(store: Store) -> None:
    """A name with no row is not ours: False, and nothing is moved."""
    orphan = store.blob_path(_sha(b"orphan"))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    assert not store.check_blob(_sha(b"orphan"))
    assert orphan.exists()


def test_check_blob_deleted(store: Store) -> None:
    """A deleted blob: True, its row is gone, the key is a miss, totals drop its bytes."""
    store.recover()
    entry, path = _commit(store, b"deleted")
    _commit(store, b"other", key="other")
    path.unlink()
    assert store.check_blob(entry.sha256)
    assert None is store._get(("blob", entry.sha256))
    assert None is store.index.get(("blob", entry.sha256))
    assert None is store.lookup("bucket", "k", None)
    assert (1, len(b"other")) == store.totals()
    assert not store.check_blob(entry.sha256)  # already handled


def test_check_blob_modified(store: Store) -> None:
    """A modified blob: True, moved to quarantine/, and lookup never returns the bytes."""
    entry, path = _commit(store, b"modified later")
    tampered = _tamper(path)
    assert store.check_blob(entry.sha256)
    assert not path.exists()
    moved = _quarantined(store)
    assert 1 == len(moved)
    assert tampered == moved[0].read_bytes()
    assert None is store.lookup("bucket", "k", None)
    assert None is store.index.get(("blob", entry.sha256))


def test_quarantine_moves_file_once(store: Store) -> None:
    """quarantine() moves the file and drops the row; a second call finds nothing to move."""
    entry, path = _commit(store, b"suspicious")
    assert store.quarantine(entry.sha256, reason="test")
    assert not path.exists()
    assert [b"suspicious"] == [p.read_bytes() for p in _quarantined(store)]
    assert None is store.index.get(("blob", entry.sha256))
    assert not store.quarantine(entry.sha256, reason="test")
    assert None is store.lookup("bucket", "k", None)


def test_lookup_tampered_mtime_quarantines(store: Store) -> None:
    """lookup on a blob whose mtime changed (same size) returns None and quarantines it."""
    entry, path = _commit(store, b"touched")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert None is store.lookup("bucket", "k", None)
    assert not path.exists()
    moved = _quarantined(store)
    assert 1 == len(moved)
    assert moved[0].name.startswith(entry.sha256 + ".")


# -- verify -------------------------------------------------------------------------------------


def test_verify_intact(store: Store) -> None:
    """Intact blobs all pass; each is counted once, shared ones too."""
    _commit(store, _data(1), key="a")
    _commit(store, _data(2, 50), key="b")
    _commit(store, _data(2, 50), key="c")
    report = store.verify()
    assert (2, 150, [], 0) == (report.checked, report.bytes, report.mismatched, report.dropped_rows)
    assert [] == _quarantined(store)
    assert ["a", "b", "c"] == [
        k for k in ("a", "b", "c") if store.lookup("bucket", k, None) is not None
    ]


def test_verify_quarantines_corrupted_blob(store: Store) -> None:
    """A blob whose bytes no longer hash to its name is reported, quarantined, its rows dropped."""
    _commit(store, _data(1), key="a")
    bad, path = _commit(store, _data(2), key="b")
    _commit(store, _data(3), key="c")
    _tamper(path)
    report = store.verify()
    assert 3 == report.checked
    assert [bad.sha256] == report.mismatched
    assert 2 == report.dropped_rows  # the obj and cur rows of "b"
    assert not path.exists()
    assert 1 == len(_quarantined(store))
    assert None is store.index.get(("obj", "bucket", "b", 'e:"b"'))
    assert None is store.lookup("bucket", "b", None)
    assert ["a", "c"] == [k for k in ("a", "c") if store.lookup("bucket", k, None) is not None]


def test_verify_catches_rewrite_that_keeps_fingerprint_fields(store: Store) -> None:
    """verify re-hashes content: it finds corruption even with the stat row re-recorded."""
    bad, path = _commit(store, _data(4), key="b")
    _tamper(path)
    # a blob row matching the tampered file: only the hash can tell
    store._set(("blob", bad.sha256), _fingerprint(os.stat(path)))
    assert store.lookup("bucket", "b", None) is not None
    report = store.verify()
    assert [bad.sha256] == report.mismatched
    assert None is store.lookup("bucket", "b", None)


def test_verify_keeps_totals_right(store: Store) -> None:
    """After verify drops a corrupted entry, totals() matches the index."""
    store.recover()
    _commit(store, _data(1), key="a")
    _, path = _commit(store, _data(2), key="b")
    _tamper(path)
    store.verify()
    _assert_consistent(store)


# -- the in-memory mirror under concurrency -----------------------------------------------------


class _IndexProxy:
    """Delegates to the real index; runs ``before_delete(key)`` ahead of each delete."""

    def __init__(self, real: Any, before_delete: Any) -> None:
        self._real = real
        self._before_delete = before_delete

    def delete(self, key: Any) -> Any:
        self._before_delete(key)
        return self._real.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_get_racing_delete_does_not_resurrect_row(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader racing check_blob's delete does not bring the deleted blob row back."""
    entry, path = _commit(store, b"deleted while a reader looks")
    k = ("blob", entry.sha256)
    reader_read = threading.Event()
    got: list[Any] = []
    real_get = store.index.get

    def spying_get(key: Any, *args: Any, **kwargs: Any) -> Any:
        value = real_get(key, *args, **kwargs)
        if key == k and threading.current_thread().name == "reader":
            reader_read.set()  # read before the delete; now wants the store's lock
        return value

    def reader() -> None:
        got.append(store._get(k))

    def before_delete(key: Any) -> None:
        if key == k:  # check_blob holds the lock and has popped the row from memory
            thread = threading.Thread(target=reader, name="reader", daemon=True)
            thread.start()
            # a store that locks before reading keeps the reader waiting: that is fine too
            reader_read.wait(0.5)
            threads.append(thread)

    threads: list[threading.Thread] = []
    monkeypatch.setattr(store.index, "get", spying_get)
    monkeypatch.setattr(store, "index", _IndexProxy(store.index, before_delete))
    path.unlink()
    assert store.check_blob(entry.sha256)
    for thread in threads:
        thread.join(5)
    assert 1 == len(got)
    assert None is store.index.get(k)
    assert None is store._get(k)
