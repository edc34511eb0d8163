"""Unit tests for AssetService under cache pressure, and revalidation (MemoryFetcher + Store)."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import errors
from assetd.config import Config, load_config
from assetd.fetcher.memory import MemoryFetcher
from assetd.service import AssetService
from assetd.store import Store

BUCKET = "autograder-assets"
KIB = 1024
SIZE = 10 * KIB


def _config(tmp_path: Path, **cache: Any) -> Config:
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "cache")})
    changes: dict[str, Any] = {"max_bytes": 100 * KIB, "min_free_bytes": 0} | cache
    return dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, **changes))


class Env:
    """A service over a MemoryFetcher and a real Store in a temp dir."""

    def __init__(self, tmp_path: Path, **cache: Any) -> None:
        self.config = _config(tmp_path, **cache)
        self.fetcher = MemoryFetcher()
        self.store = Store(self.config.cache.dir)
        self.service = AssetService(self.config, self.fetcher, self.store)

    def put(self, key: str, data: bytes) -> str:
        self.fetcher.put(BUCKET, key, data)
        return f"s3://{BUCKET}/{key}"

    def set_cache(self, **cache: Any) -> None:
        self.config = dataclasses.replace(
            self.config, cache=dataclasses.replace(self.config.cache, **cache)
        )
        self.service.reconfigure(self.config)

    def close(self) -> None:
        self.service.close()
        self.store.close()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """A factory for Env objects, all closed after the test."""
    made: list[Env] = []

    def make(**cache: Any) -> Env:
        env = Env(tmp_path / f"env{len(made)}", **cache)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def _data(i: int) -> bytes:
    """10 KiB of bytes distinct per i."""
    return hashlib.sha256(str(i).encode()).digest() * (SIZE // 32)


def _assert_blobs_intact(env: Env) -> None:
    """Every blob file hashes to its name and nothing is left in tmp/."""
    files = [p for p in env.store.blobs.rglob("*") if p.is_file()]
    for path in files:
        assert path.name == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [] == list(env.store.tmp.iterdir())


# -- eviction -----------------------------------------------------------------------------------


def test_eviction_across_a_stream_of_distinct_resolves(make_env: Callable[..., Env]) -> None:
    """50 distinct 10 KiB objects through a 100 KiB cache: all resolve, bytes stay capped."""
    env = make_env(pin_seconds=0.0)
    max_bytes = env.config.cache.max_bytes
    sources = [env.put(f"stream/{i:02d}.bin", _data(i)) for i in range(50)]
    for i, src in enumerate(sources):
        res = env.service.resolve(src)
        assert "miss" == res.cache
        assert _data(i) == res.path.read_bytes()
        assert env.store.totals()[1] <= max_bytes
    assert 50 == env.fetcher.requests["get"]
    assert env.store.totals()[0] <= max_bytes // SIZE
    assert "hit" == env.service.resolve(sources[-1]).cache
    assert 50 == env.fetcher.requests["get"]
    evicted = env.service.resolve(sources[0])  # long gone: fetched again
    assert "miss" == evicted.cache
    assert _data(0) == evicted.path.read_bytes()
    _assert_blobs_intact(env)


def test_never_evicts_a_pinned_entry(make_env: Callable[..., Env]) -> None:
    """All entries pinned: a resolve past max_bytes fails with cache_full, corrupting nothing."""
    env = make_env(pin_seconds=3600.0)
    sources = [env.put(f"pinned/{i}.bin", _data(i)) for i in range(10)]
    paths = [env.service.resolve(src).path for src in sources]
    assert (10, 100 * KIB) == env.store.totals()
    extra = env.put("pinned/one-too-many.bin", _data(99))
    with pytest.raises(errors.CacheFull) as info:
        env.service.resolve(extra)
    assert info.value.retryable
    assert 1 == env.service.errors["cache_full"]
    assert 11 == env.fetcher.requests["get"]  # refused on the first GET's size, nothing written
    _assert_blobs_intact(env)
    for i, (src, path) in enumerate(zip(sources, paths, strict=True)):
        res = env.service.resolve(src)
        assert "hit" == res.cache
        assert path == res.path
        assert _data(i) == res.path.read_bytes()


def test_expired_pins_make_room_again(make_env: Callable[..., Env]) -> None:
    """Once the pins of a full cache have run out, the next resolve evicts and succeeds."""
    env = make_env(pin_seconds=0.3)
    sources = [env.put(f"p/{i}.bin", _data(i)) for i in range(10)]
    for src in sources:
        env.service.resolve(src)
    time.sleep(0.35)
    res = env.service.resolve(env.put("p/next.bin", _data(10)))
    assert "miss" == res.cache
    assert env.store.totals()[1] <= env.config.cache.max_bytes
    assert None is env.store.lookup(BUCKET, "p/0.bin", None)


def test_shared_blob_stays_while_one_key_is_pinned(make_env: Callable[..., Env]) -> None:
    """Identical bytes under two keys: evicting the unpinned one keeps the pinned one's blob."""
    env = make_env(pin_seconds=3600.0)
    shared = _data(1000)
    pinned = env.service.resolve(env.put("dup/pinned.bin", shared))
    env.set_cache(pin_seconds=0.0)
    unpinned_src = env.put("dup/unpinned.bin", shared)
    unpinned = env.service.resolve(unpinned_src)
    assert pinned.path == unpinned.path
    inode = os.stat(pinned.path).st_ino
    for i in range(30):  # pressure: three times the cache
        env.service.resolve(env.put(f"dup/other-{i}.bin", _data(i)))
        assert env.store.totals()[1] <= env.config.cache.max_bytes
    assert None is env.store.lookup(BUCKET, "dup/unpinned.bin", None)
    assert inode == os.stat(pinned.path).st_ino
    again = env.service.resolve(f"s3://{BUCKET}/dup/pinned.bin")
    assert "hit" == again.cache
    assert pinned.path == again.path
    assert shared == again.path.read_bytes()
    refetched = env.service.resolve(unpinned_src)
    assert "miss" == refetched.cache
    assert pinned.path == refetched.path
    assert inode == os.stat(refetched.path).st_ino  # the existing blob is reused, not rewritten
    _assert_blobs_intact(env)


# -- revalidation -------------------------------------------------------------------------------


def test_revalidate_every_resolve_unchanged_is_hit(make_env: Callable[..., Env]) -> None:
    """revalidate_after_s=0: each resolve sends one conditional GET; unchanged objects are hits."""
    env = make_env(revalidate_after_s=0.0)
    src = env.put("reval/a.csv", b"a,b\n1,2\n")
    assert "miss" == env.service.resolve(src).cache
    for n in range(2, 5):
        assert "hit" == env.service.resolve(src).cache
        assert {"get": n} == dict(env.fetcher.requests)


def test_revalidate_every_resolve_changed_is_miss(make_env: Callable[..., Env]) -> None:
    """revalidate_after_s=0: an overwritten object is fetched again and the new bytes served."""
    env = make_env(revalidate_after_s=0.0)
    src = env.put("reval/b.csv", b"old\n")
    old = env.service.resolve(src)
    new_obj = env.fetcher.put(BUCKET, "reval/b.csv", b"new bytes\n")
    res = env.service.resolve(src)
    assert "miss" == res.cache
    assert b"new bytes\n" == res.path.read_bytes()
    assert new_obj.etag == res.etag
    assert b"old\n" == old.path.read_bytes()
    assert {"get": 2} == dict(env.fetcher.requests)
    assert "hit" == env.service.resolve(src).cache


def test_overwrite_unseen_within_revalidation_window(make_env: Callable[..., Env]) -> None:
    """Within revalidate_after_s an overwrite is not seen: the old bytes are served (documented)."""
    env = make_env(revalidate_after_s=60.0)
    src = env.put("reval/c.csv", b"first\n")
    env.service.resolve(src)
    env.fetcher.put(BUCKET, "reval/c.csv", b"second\n")
    res = env.service.resolve(src)
    assert "hit" == res.cache
    assert b"first\n" == res.path.read_bytes()
    assert {"get": 1} == dict(env.fetcher.requests)


def test_stale_served_when_revalidation_fails(make_env: Callable[..., Env]) -> None:
    """S3 unavailable on revalidation with serve_stale_on_error: the verified copy, as stale."""
    env = make_env(revalidate_after_s=0.0, serve_stale_on_error=True)
    src = env.put("reval/d.csv", b"keep serving me\n")
    first = env.service.resolve(src)
    attempts = env.fetcher.retry.max_attempts
    env.fetcher.faults.get.extend(errors.Unavailable("S3 down") for _ in range(attempts))
    res = env.service.resolve(src)
    assert "stale" == res.cache
    assert first.path == res.path
    assert b"keep serving me\n" == res.path.read_bytes()
    assert 1 + attempts == env.fetcher.requests["get"]
    assert 1 == env.service.counters["stale"]
    assert "hit" == env.service.resolve(src).cache  # S3 back: revalidated again, not stuck stale


def test_revalidation_retry_that_recovers_is_hit(make_env: Callable[..., Env]) -> None:
    """Fewer failures than the retry budget: revalidation succeeds and the answer is a hit."""
    env = make_env(revalidate_after_s=0.0)
    src = env.put("reval/e.csv", b"flaky\n")
    env.service.resolve(src)
    env.fetcher.faults.get.append(errors.Unavailable("blip"))
    assert "hit" == env.service.resolve(src).cache
    assert 0 == env.service.counters["stale"]


def test_deleted_object_on_revalidation_is_not_found(make_env: Callable[..., Env]) -> None:
    """An object deleted from S3 is not_found on revalidation, never served stale."""
    env = make_env(revalidate_after_s=0.0, serve_stale_on_error=True)
    src = env.put("reval/f.csv", b"soon deleted\n")
    env.service.resolve(src)
    del env.fetcher.objects[(BUCKET, "reval/f.csv")]
    with pytest.raises(errors.NotFound):
        env.service.resolve(src)
    assert 0 == env.service.counters["stale"]
    assert 1 == env.service.errors["not_found"]


def test_reserve_during_recovery_does_not_deadlock(tmp_path: Path) -> None:
    """A miss while start-up recovery runs neither deadlocks nor blocks the hit path's lock."""
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "c")})
    fetcher = MemoryFetcher()
    fetcher.put("bkt-test", "a", b"a" * 100)
    store = Store(cfg.cache.dir)
    slow = store._load_all

    def slow_load_all() -> Any:
        time.sleep(0.3)  # recovery holds its own lock while it scans
        return slow()

    store._load_all = slow_load_all  # type: ignore[method-assign]
    service = AssetService(cfg, fetcher, store)
    recovery = threading.Thread(target=store.recover)
    recovery.start()
    time.sleep(0.05)
    answer: list[Any] = []
    miss = threading.Thread(target=lambda: answer.append(service.resolve("s3://bkt-test/a")))
    miss.start()
    time.sleep(0.1)
    took_lock = store._lock.acquire(timeout=2)
    if took_lock:
        store._lock.release()
    recovery.join(5)
    miss.join(5)
    service.close()
    store.close()
    assert (True, "miss") == (took_lock, answer[0].cache)


def test_entry_evicted_during_revalidation_is_fetched_again(tmp_path: Path) -> None:
    """An entry evicted while its revalidation HEAD is out is never answered with its old path."""
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(tmp_path / "c")})
    cache = dataclasses.replace(
        cfg.cache, max_bytes=100 * 1024, min_free_bytes=0, pin_seconds=0.0, revalidate_after_s=0.0
    )
    cfg = dataclasses.replace(cfg, cache=cache)
    fetcher = MemoryFetcher()
    store = Store(cfg.cache.dir)
    service = AssetService(cfg, fetcher, store)
    fetcher.put("bkt-test", "old", b"o" * 1024)
    first = service.resolve("s3://bkt-test/old")
    real = fetcher.revalidate

    def revalidate_then_evict(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        store.evict(max_bytes=0, min_free_bytes=0)  # another miss made room meanwhile
        return out

    fetcher.revalidate = revalidate_then_evict  # type: ignore[method-assign]
    again = service.resolve("s3://bkt-test/old")
    exists = again.path.exists()
    service.close()
    store.close()
    assert (first.sha256, "miss", True) == (again.sha256, again.cache, exists)
