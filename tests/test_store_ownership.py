"""Unit tests for the store's ownership and durability edges (issue 11).

The cache lock, temp files of live processes, the quarantine bounds, and
pins when the index cannot be written.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import errors
from assetd.store import HEADROOM_BYTES, CacheLocked, Store
from tests.support.cache import commit_bytes

FAR = 1e12


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The cache directory."""
    return tmp_path / "cache"


@pytest.fixture
def owner(root: Path) -> Iterator[Store]:
    """A store that owns the cache, as the daemon's does."""
    s = Store(root, lock=True)
    yield s
    s.close()


# -- the lock -------------------------------------------------------------------------------------


def test_second_owner_is_refused_with_the_holders_pid(owner: Store, root: Path) -> None:
    """Two stores can never both own one cache; the refusal names the holder."""
    with pytest.raises(CacheLocked) as info:
        Store(root, lock=True)
    assert os.getpid() == info.value.holder


def test_lock_is_released_on_close(root: Path) -> None:
    """Closing the owner frees the cache for the next one."""
    Store(root, lock=True).close()
    Store(root, lock=True).close()


def test_passes_of_one_non_owner_store_do_not_refuse_each_other(root: Path) -> None:
    """Threads of one store (no daemon around) evict at once: none gets CacheLocked."""
    store = Store(root)
    started, release = threading.Event(), threading.Event()
    errors_seen: list[BaseException] = []

    def long_pass() -> None:
        try:
            with store._exclusive():
                started.set()
                release.wait(10)
        except BaseException as exc:  # what is being counted
            errors_seen.append(exc)

    t = threading.Thread(target=long_pass)
    t.start()
    try:
        assert started.wait(10)
        report = store.evict(max_bytes=1 << 30, min_free_bytes=0)  # while the other pass runs
    finally:
        release.set()
        t.join(10)
    assert ([], False) == (errors_seen, report.full)
    Store(root, lock=True).close()  # every pass released the lock file
    store.close()


@pytest.mark.parametrize("op", ["recover", "verify"])
def test_destructive_pass_refused_beside_an_owner(owner: Store, root: Path, op: str) -> None:
    """A non-owner store cannot run recovery or verify while another process owns the cache."""
    commit_bytes(owner, b"pinned", pinned_until=FAR)
    other = Store(root)
    try:
        with pytest.raises(CacheLocked):
            getattr(other, op)()
    finally:
        other.close()


def test_non_owner_recovery_cannot_delete_a_blob_the_owner_just_published(
    owner: Store, root: Path
) -> None:
    """Issue 11 Why 5: gc's recovery listed blobs/ just after the daemon's commit and deleted it.

    The owner commits exactly between the other store's reading of its rows
    and its listing of blobs/; without the lock that blob is deleted.
    """
    other = Store(root)
    published: list[Path] = []
    real = other._referenced

    def referenced_then_owner_commits() -> set[str]:
        seen = real()
        if not published:
            published.append(commit_bytes(owner, b"handed to a grader", pinned_until=FAR)[1])
        return seen

    other._referenced = referenced_then_owner_commits  # type: ignore[method-assign]
    refused = False
    try:
        other.recover()
    except CacheLocked:
        refused = True
    finally:
        other.close()
    if not published:
        published.append(commit_bytes(owner, b"handed to a grader", pinned_until=FAR)[1])
    assert (True, True) == (refused, published[0].exists())


# -- quarantine -----------------------------------------------------------------------------------


def _quarantined(store: Store, name: str, size: int, age_s: float) -> Path:
    path = store.quarantine_dir / name
    path.write_bytes(b"q" * size)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_quarantine_is_counted(owner: Store) -> None:
    """quarantine_usage counts files and bytes in quarantine/ (issue 11, Why 7)."""
    _quarantined(owner, "a", 10, 0)
    _quarantined(owner, "b", 30, 0)
    assert (2, 40) == owner.quarantine_usage()


def test_quarantine_pruned_by_age(owner: Store) -> None:
    """Files older than max_age_s go; younger ones stay."""
    old = _quarantined(owner, "old", 10, 100)
    young = _quarantined(owner, "young", 10, 1)
    assert 1 == owner.prune_quarantine(max_age_s=50, max_bytes=1 << 30)
    assert (False, True) == (old.exists(), young.exists())


def test_quarantine_pruned_by_size_oldest_first(owner: Store) -> None:
    """Over max_bytes, the oldest files go until the rest fit."""
    a = _quarantined(owner, "a", 100, 30)
    b = _quarantined(owner, "b", 100, 20)
    c = _quarantined(owner, "c", 100, 10)
    assert 2 == owner.prune_quarantine(max_age_s=1e9, max_bytes=150)
    assert (False, False, True) == (a.exists(), b.exists(), c.exists())


# -- pins when the index cannot be written --------------------------------------------------------


class _FailingIndex:
    """Wraps the diskcache index; ``transact`` fails while ``error`` is set."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: Exception | None = None

    def transact(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.inner.transact()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_failed_flush_keeps_pins_and_refuses_new_ones(owner: Store, root: Path) -> None:
    """A pin already given stays dirty until written; meanwhile no new pin is given (Why 8)."""
    entry, _ = commit_bytes(owner, b"data", pinned_until=0.0)
    index = _FailingIndex(owner.index)
    owner.index = index  # type: ignore[assignment]
    assert FAR == owner.touch("bucket", "k", entry, pinned_until=FAR)
    index.error = sqlite3.OperationalError("disk I/O error")
    with pytest.raises(errors.InternalError):
        owner.flush()
    with pytest.raises(errors.AssetError) as info:
        owner.touch("bucket", "k", entry, pinned_until=FAR + 1)
    assert info.value.retryable
    index.error = None
    assert 1 == owner.flush()  # the pin given before the failure reaches the index
    assert FAR == index.inner.get(("obj", "bucket", "k", f"e:{entry.etag}"))["pinned_until"]
    assert FAR + 1 == owner.touch("bucket", "k", entry, pinned_until=FAR + 1)


def test_disk_full_flush_uses_the_headroom(owner: Store, root: Path) -> None:
    """On a disk-full flush the headroom is given up and the promised pins still written."""
    entry, _ = commit_bytes(owner, b"data", pinned_until=0.0)
    assert HEADROOM_BYTES == (root / "headroom").stat().st_size
    index = _FailingIndex(owner.index)
    owner.index = index  # type: ignore[assignment]
    owner.touch("bucket", "k", entry, pinned_until=FAR)
    calls = []
    real = index.transact

    def full_once() -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database or disk is full")
        return real()

    index.transact = full_once  # type: ignore[method-assign]
    assert 1 == owner.flush()
    assert FAR == index.inner.get(("obj", "bucket", "k", f"e:{entry.etag}"))["pinned_until"]
    assert (root / "headroom").exists()  # made again once the write went through


def test_failed_commit_of_an_existing_row_keeps_its_pin(owner: Store, root: Path) -> None:
    """A refetch whose index write fails leaves the entry and its unflushed pin as they were."""
    entry, _ = commit_bytes(owner, b"data", pinned_until=0.0)
    assert FAR == owner.touch("bucket", "k", entry, pinned_until=FAR)  # in memory, not flushed
    index = _FailingIndex(owner.index)
    owner.index = index  # type: ignore[assignment]
    index.error = sqlite3.OperationalError("disk I/O error")
    with pytest.raises(errors.InternalError):
        commit_bytes(owner, b"data", pinned_until=0.0)  # the same key and ETag, fetched again
    index.error = None
    assert 1 == owner.flush()
    assert FAR == index.inner.get(("obj", "bucket", "k", f"e:{entry.etag}"))["pinned_until"]
    hit = owner.lookup("bucket", "k", None)
    assert hit is not None
    assert (entry.sha256, FAR) == (hit.entry.sha256, hit.pinned_until)


def test_sweep_keeps_a_fresh_temp_file_of_this_process(owner: Store, root: Path) -> None:
    """A download's temp file made a moment before it is registered survives housekeeping."""
    fresh = root / "tmp" / f"blob-{os.getpid()}-unregistered.part"
    fresh.write_bytes(b"partial")
    old = root / "tmp" / f"blob-{os.getpid()}-leftover.part"
    old.write_bytes(b"partial")
    past = time.time() - 3600
    os.utime(old, (past, past))
    owner.sweep_tmp()
    assert (True, False) == (fresh.exists(), old.exists())
