"""Unit tests for assetd.store: content-addressed blobs and the index."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd.store import Entry, Store
from tests.support.cache import commit_bytes


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A Store in a fresh temp cache directory."""
    s = Store(tmp_path / "cache")
    yield s
    s.close()


def _commit(store: Store, data: bytes, **kwargs: Any) -> tuple[Entry, Path]:
    kwargs.setdefault("etag", '"x"')
    return commit_bytes(store, data, **kwargs)


def _blob_files(store: Store) -> list[Path]:
    return sorted(p for p in store.blobs.rglob("*") if p.is_file())


def _tmp_entries(store: Store) -> list[Path]:
    return sorted(store.tmp.iterdir())


def test_open_creates_layout(tmp_path: Path) -> None:
    """Opening a store creates blobs/sha256, tmp and index under the root."""
    root = tmp_path / "new" / "cache"
    s = Store(root)
    try:
        assert (root / "blobs" / "sha256").is_dir()
        assert (root / "tmp").is_dir()
        assert (root / "index").is_dir()
        assert 0 == s.removed_temps
    finally:
        s.close()


def test_commit_then_lookup(store: Store) -> None:
    """A committed blob is found again with its metadata, at the content address."""
    data = b"name,score\nana,10\n"
    digest = hashlib.sha256(data).hexdigest()
    entry, path = _commit(store, data, etag='"e1"', pinned_until=123.0)
    assert store.root / "blobs" / "sha256" / digest[:2] / digest == path
    assert store.blob_path(digest) == path
    assert data == path.read_bytes()
    assert 0o444 == stat.S_IMODE(os.stat(path).st_mode)
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert digest == entry.sha256
    assert len(data) == entry.size
    assert '"e1"' == entry.etag
    assert None is entry.version_id
    assert 123.0 == entry.pinned_until

    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert entry == hit.entry
    assert path == hit.path
    assert [] == _tmp_entries(store)


def test_lookup_unknown_key_is_none(store: Store) -> None:
    """An object never committed is a miss, in any bucket, key or version."""
    _commit(store, b"data")
    assert None is store.lookup("bucket", "other", None)
    assert None is store.lookup("other-bucket", "k", None)
    assert None is store.lookup("bucket", "k", "v1")


def test_commit_survives_reopen(tmp_path: Path) -> None:
    """Committed entries are found by a new Store on the same directory."""
    s = Store(tmp_path / "c")
    entry, path = _commit(s, b"persist me")
    s.close()
    s2 = Store(tmp_path / "c")
    try:
        hit = s2.lookup("bucket", "k", None)
        assert hit is not None
        assert entry == hit.entry
        assert path == hit.path
    finally:
        s2.close()


def test_identical_content_stored_once(store: Store) -> None:
    """The same bytes under two keys share one blob file."""
    data = b"shared bytes" * 100
    _, path_a = _commit(store, data, key="a", etag='"ea"')
    first = os.stat(path_a)
    _, path_b = _commit(store, data, bucket="bucket-two", key="b", etag='"eb"')
    assert path_a == path_b
    # the existing blob is kept, not replaced: same inode, same ctime
    assert (first.st_ino, first.st_ctime_ns) == (
        os.stat(path_b).st_ino,
        os.stat(path_b).st_ctime_ns,
    )
    assert [path_a] == _blob_files(store)
    hit_a = store.lookup("bucket", "a", None)
    hit_b = store.lookup("bucket-two", "b", None)
    assert hit_a is not None
    assert hit_b is not None
    assert '"ea"' == hit_a.entry.etag
    assert '"eb"' == hit_b.entry.etag
    assert [] == _tmp_entries(store)


def test_different_content_stored_separately(store: Store) -> None:
    """Different bytes get different blob files."""
    _commit(store, b"one", key="a")
    _commit(store, b"two", key="b")
    assert 2 == len(_blob_files(store))


def test_tmp_leftovers_removed_on_open(tmp_path: Path) -> None:
    """Files and directories left in tmp/ by a crash are removed when the store opens."""
    root = tmp_path / "c"
    Store(root).close()
    (root / "tmp" / "blob-1.part").write_bytes(b"partial")
    (root / "tmp" / "blob-2.part").write_bytes(b"")
    (root / "tmp" / "subdir").mkdir()
    (root / "tmp" / "subdir" / "f").write_bytes(b"x")
    s = Store(root)
    try:
        assert 3 == s.removed_temps
        assert [] == _tmp_entries(s)
    finally:
        s.close()


def test_tmp_cleanup_does_not_follow_symlinks(tmp_path: Path) -> None:
    """A symlink in tmp/ is removed without touching what it points at."""
    root = tmp_path / "c"
    Store(root).close()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"keep")
    (root / "tmp" / "link").symlink_to(outside)
    s = Store(root)
    try:
        assert [] == _tmp_entries(s)
        assert b"keep" == (outside / "keep").read_bytes()
    finally:
        s.close()


def test_missing_blob_is_a_miss_and_drops_row(store: Store) -> None:
    """A deleted blob makes lookup return None and forgets the index row."""
    _, path = _commit(store, b"to be deleted")
    path.unlink()
    assert None is store.lookup("bucket", "k", None)
    assert None is store.index.get(("obj", "bucket", "k", 'e:"x"'))
    # even if the bytes come back, the dropped row stays dropped
    path.write_bytes(b"to be deleted")
    assert None is store.lookup("bucket", "k", None)


def test_blob_rewritten_longer_is_a_miss(store: Store) -> None:
    """A blob made writable and rewritten (different size) is never served."""
    _, path = _commit(store, b"original")
    os.chmod(path, 0o644)
    path.write_bytes(b"original plus tampering")
    assert None is store.lookup("bucket", "k", None)
    assert None is store.index.get(("obj", "bucket", "k", 'e:"x"'))


def test_blob_rewritten_same_length_is_a_miss(store: Store) -> None:
    """A same-length rewrite is caught by the changed mtime/ctime."""
    _, path = _commit(store, b"AAAAAAAA")
    time.sleep(0.02)  # past the file system's timestamp granularity
    os.chmod(path, 0o644)
    path.write_bytes(b"BBBBBBBB")
    assert None is store.lookup("bucket", "k", None)


def test_blob_utime_is_a_miss(store: Store) -> None:
    """Only changing the blob's mtime (os.utime) already makes it a miss."""
    _, path = _commit(store, b"timestamps matter")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert None is store.lookup("bucket", "k", None)


def test_blob_replaced_by_new_inode_is_a_miss(store: Store) -> None:
    """A blob swapped for another file with the same bytes (new inode) is a miss."""
    data = b"same bytes, new file"
    _, path = _commit(store, data)
    other = store.root / "elsewhere"
    other.write_bytes(data)
    os.replace(other, path)
    assert None is store.lookup("bucket", "k", None)


def test_tampered_blob_is_replaced_by_next_commit(store: Store) -> None:
    """After tampering, committing the same content again restores a valid blob."""
    data = b"restore me"
    _, path = _commit(store, data)
    os.chmod(path, 0o644)
    path.write_bytes(b"garbage!!!")
    assert None is store.lookup("bucket", "k", None)
    _, path2 = _commit(store, data)
    assert path == path2
    assert data == path.read_bytes()
    assert 0o444 == stat.S_IMODE(os.stat(path).st_mode)
    assert store.lookup("bucket", "k", None) is not None


def test_staged_never_committed_leaves_nothing(store: Store) -> None:
    """A staged blob that is not committed disappears from tmp/ and blobs/."""
    with store.staged() as st:
        st.write(memoryview(b"abandoned"))
        assert st.path.exists()
        assert 9 == st.size
    assert [] == _tmp_entries(store)
    assert [] == _blob_files(store)


def test_staged_removed_on_exception(store: Store) -> None:
    """An exception inside staged() still removes the temp file."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom), store.staged() as st:
        st.write(memoryview(b"partial"))
        raise Boom
    assert [] == _tmp_entries(store)


def test_staged_reset_truncates(store: Store) -> None:
    """reset() empties the staged file so a retry starts from zero."""
    data = b"final"
    with store.staged() as st:
        st.write(memoryview(b"first attempt, longer"))
        st.reset()
        st.write(memoryview(data))
        assert len(data) == st.size
        _, path = store.commit(
            st,
            bucket="bucket",
            key="k",
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            etag='"x"',
            version_id=None,
            requested_version=None,
            pinned_until=0.0,
        )
    assert data == path.read_bytes()


def test_versioned_commit_does_not_move_current(store: Store) -> None:
    """Committing a requested version leaves what unversioned lookups see alone."""
    _commit(store, b"latest", etag='"e2"', version_id="v2")
    _commit(store, b"old", etag='"e1"', version_id="v1", requested_version="v1")
    current = store.lookup("bucket", "k", None)
    assert current is not None
    assert b"latest" == current.path.read_bytes()
    assert "v2" == current.entry.version_id
    old = store.lookup("bucket", "k", "v1")
    assert old is not None
    assert b"old" == old.path.read_bytes()
    assert "v1" == old.entry.version_id


def test_versioned_commit_alone_gives_no_current(store: Store) -> None:
    """Only a requested version is cached: an unversioned lookup is still a miss."""
    _commit(store, b"pinned", version_id="v7", requested_version="v7")
    assert None is store.lookup("bucket", "k", None)
    assert store.lookup("bucket", "k", "v7") is not None


def test_unversioned_commit_of_versioned_object_serves_version(store: Store) -> None:
    """The latest object, when versioned, is found both unversioned and by its version."""
    _commit(store, b"latest", version_id="v3")
    by_cur = store.lookup("bucket", "k", None)
    by_version = store.lookup("bucket", "k", "v3")
    assert by_cur is not None
    assert by_version is not None
    assert by_cur.entry == by_version.entry


def test_new_etag_moves_current(store: Store) -> None:
    """A newer unversioned commit of the same key becomes the current entry."""
    _commit(store, b"first", etag='"e1"')
    _commit(store, b"second", etag='"e2"')
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert '"e2"' == hit.entry.etag
    assert b"second" == hit.path.read_bytes()


def test_mark_checked(store: Store) -> None:
    """mark_checked stores the check time that lookup reports."""
    _commit(store, b"data")
    store.mark_checked("bucket", "k", now=1234.5)
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert 1234.5 == hit.checked_at


def test_mark_checked_defaults_to_now(store: Store) -> None:
    """mark_checked without a time records the current time."""
    _commit(store, b"data")
    store.mark_checked("bucket", "k", now=0.0)
    before = time.time()
    store.mark_checked("bucket", "k")
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert before <= hit.checked_at <= time.time()


def test_mark_checked_unknown_key_is_noop(store: Store) -> None:
    """mark_checked on a key never committed creates nothing."""
    store.mark_checked("bucket", "nope", now=1.0)
    assert None is store.index.get(("cur", "bucket", "nope"))
    assert None is store.lookup("bucket", "nope", None)


def test_checked_at_set_at_commit(store: Store) -> None:
    """A fresh commit counts as checked at commit time."""
    before = time.time()
    _commit(store, b"data")
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert before <= hit.checked_at <= time.time()


def test_versioned_lookup_checked_at_zero(store: Store) -> None:
    """A lookup by version reports checked_at 0: versions need no revalidation."""
    _commit(store, b"data", version_id="v1", requested_version="v1")
    hit = store.lookup("bucket", "k", "v1")
    assert hit is not None
    assert 0.0 == hit.checked_at


def test_touch_extends_pin_and_access(store: Store) -> None:
    """touch updates last_access and keeps the later of the two pins."""
    entry, _ = _commit(store, b"data", pinned_until=100.0)
    before = time.time()
    assert 500.0 == store.touch("bucket", "k", entry, pinned_until=500.0)
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert 500.0 == hit.pinned_until
    assert before <= hit.last_access <= time.time()
    assert (entry.sha256, entry.fetched_at) == (hit.entry.sha256, hit.entry.fetched_at)


def test_touch_reaches_the_index_on_flush(tmp_path: Path) -> None:
    """Pins live in memory until flush; after it a fresh Store sees them."""
    first = Store(tmp_path / "c")
    entry, _ = _commit(first, b"data", pinned_until=100.0)
    first.touch("bucket", "k", entry, pinned_until=700.0)
    assert 1 == first.flush()
    first.close()
    second = Store(tmp_path / "c")
    hit = second.lookup("bucket", "k", None)
    second.close()
    assert hit is not None
    assert 700.0 == hit.pinned_until


def test_touch_never_shortens_pin(store: Store) -> None:
    """touch with an earlier pin keeps the existing, later one."""
    entry, _ = _commit(store, b"data", pinned_until=900.0)
    assert 900.0 == store.touch("bucket", "k", entry, pinned_until=10.0)
    hit = store.lookup("bucket", "k", None)
    assert hit is not None
    assert 900.0 == hit.pinned_until


def test_touch_versioned_entry(store: Store) -> None:
    """touch on a versioned entry updates the row found by that version."""
    entry, _ = _commit(store, b"data", version_id="v1", requested_version="v1", pinned_until=1.0)
    store.touch("bucket", "k", entry, pinned_until=2.0)
    hit = store.lookup("bucket", "k", "v1")
    assert hit is not None
    assert 2.0 == hit.pinned_until


def test_discard_blob(store: Store) -> None:
    """discard_blob deletes the file, and every key naming it reads as a miss."""
    data = b"shared then discarded"
    _, path = _commit(store, data, key="a")
    _commit(store, data, key="b")
    store.discard_blob(hashlib.sha256(data).hexdigest())
    assert not path.exists()
    assert None is store.lookup("bucket", "a", None)
    assert None is store.lookup("bucket", "b", None)
    _, again = _commit(store, data, key="a")
    assert data == again.read_bytes()
    assert store.lookup("bucket", "a", None) is not None


def test_discard_missing_blob_is_noop(store: Store) -> None:
    """discard_blob of an unknown digest does nothing and does not fail."""
    store.discard_blob("0" * 64)
    assert [] == _blob_files(store)


# --- lookup_content: the rows behind sha256 pins ----------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_lookup_content_finds_older_content_after_refetch(store: Store) -> None:
    """After a new ETag moved cur, the key's older entry is still found by its digest."""
    _commit(store, b"old", etag='"e1"')
    _commit(store, b"new", etag='"e2"')
    old = store.lookup_content("bucket", "k", _sha(b"old"), None)
    new = store.lookup_content("bucket", "k", _sha(b"new"), None)
    assert old is not None and new is not None
    assert (b"old", '"e1"') == (old.path.read_bytes(), old.entry.etag)
    assert (b"new", '"e2"') == (new.path.read_bytes(), new.entry.etag)
    assert '"e2"' == store.lookup("bucket", "k", None).entry.etag  # type: ignore[union-attr]


def test_lookup_content_survives_reopen(tmp_path: Path) -> None:
    """dig rows are in the index: a restarted daemon finds older content too."""
    s1 = Store(tmp_path / "c")
    _commit(s1, b"old", etag='"e1"')
    _commit(s1, b"new", etag='"e2"')
    s1.close()
    s2 = Store(tmp_path / "c")
    try:
        assert None is s2.lookup_content("bucket", "k", _sha(b"old"), None, memory_only=True)
        hit = s2.lookup_content("bucket", "k", _sha(b"old"), None)
        assert hit is not None
        assert b"old" == hit.path.read_bytes()
    finally:
        s2.close()


def test_lookup_content_only_this_key(store: Store) -> None:
    """Bytes cached under another key are not this key's content."""
    _commit(store, b"shared", key="other")
    _commit(store, b"mine", key="k")
    assert None is store.lookup_content("bucket", "k", _sha(b"shared"), None)
    assert store.lookup_content("bucket", "other", _sha(b"shared"), None) is not None


def test_lookup_content_with_version_only_that_version(store: Store) -> None:
    """With a version_id, only that version's row counts."""
    _commit(store, b"one", version_id="v1", requested_version="v1")
    _commit(store, b"two", version_id="v2", requested_version="v2")
    assert store.lookup_content("bucket", "k", _sha(b"one"), "v1") is not None
    assert None is store.lookup_content("bucket", "k", _sha(b"one"), "v2")


def test_lookup_content_refuses_changed_blob(store: Store) -> None:
    """A blob whose bytes changed under the cache is not served by digest either."""
    _, path = _commit(store, b"data")
    os.chmod(path, 0o644)
    path.write_bytes(b"evil")
    assert None is store.lookup_content("bucket", "k", _sha(b"data"), None)


def test_eviction_drops_the_dig_row(store: Store) -> None:
    """Evicting an entry removes the row that found it by digest."""
    _commit(store, b"old", etag='"e1"')
    _commit(store, b"new", etag='"e2"')
    store.evict(max_bytes=3, min_free_bytes=0, now=float("inf"))
    assert None is store.lookup_content("bucket", "k", _sha(b"old"), None)
    assert ("dig", "bucket", "k", _sha(b"old")) not in store.index
