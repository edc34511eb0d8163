"""Unit tests for sha256 pins and asset:// aliases in assetd.service (MemoryFetcher, real Store)."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import pytest

from assetd import errors
from assetd import service as service_module
from assetd.catalog import Catalog, CatalogEntry
from assetd.uri import S3Source
from tests.support.service import Env

BUCKET = "autograder-assets"
KEY = "datasets/tp2/RESTAURANTES.CSV"
SRC = f"s3://{BUCKET}/{KEY}"
OLD = b"id,nombre\n1,El Fogon\n"
NEW = b"id,nombre\n1,El Fogon\n2,La Esquina\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    """Revalidation on every resolve, so any S3 request a pin saves shows in the counters."""
    return make_env(cache={"revalidate_after_s": 0.0})


def _requests(env: Env) -> dict[str, int]:
    return dict(env.fetcher.requests)


# --- pins --------------------------------------------------------------------------


def test_pin_served_after_overwrite_without_asking_s3(env: Env) -> None:
    """A pin to content the key held before an overwrite and refetch is a hit, no S3 request."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    env.fetcher.put(BUCKET, KEY, NEW)
    assert sha(NEW) == env.service.resolve(SRC).sha256  # refetched: cur moved to NEW
    before = _requests(env)
    pinned = env.service.resolve(SRC, sha256=sha(OLD))
    assert ("hit", sha(OLD), OLD) == (pinned.cache, pinned.sha256, pinned.path.read_bytes())
    assert before == _requests(env)


def test_pin_served_while_s3_fails_even_without_stale(make_env: Callable[..., Env]) -> None:
    """With serve_stale_on_error off and S3 failing, the pinned cached bytes are still served."""
    env = make_env(cache={"revalidate_after_s": 0.0, "serve_stale_on_error": False})
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    env.fetcher.faults.get.extend([errors.Unavailable("down")] * 10)
    with pytest.raises(errors.Unavailable):
        env.service.resolve(SRC)
    assert "hit" == env.service.resolve(SRC, sha256=sha(OLD)).cache


def test_pin_served_after_delete_despite_negative_cache(env: Env) -> None:
    """The object deleted and its not_found remembered: the pinned cached bytes are still served."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    del env.fetcher.objects[(BUCKET, KEY)]
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC)
    assert "hit" == env.service.resolve(SRC, sha256=sha(OLD)).cache
    with pytest.raises(errors.NotFound):  # other content: the remembered not_found stands
        env.service.resolve(SRC, sha256=sha(NEW))
    assert 2 == _requests(env)["get"]  # the first fetch and the not_found, nothing after


class _Clock:
    """The service's ``time`` module with a monotonic clock the test moves ahead."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead

    @staticmethod
    def time() -> float:
        return time.time()


def test_pinned_repeats_do_not_extend_a_remembered_not_found(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A not_found is remembered negative_ttl_s from S3's answer, however often pins repeat it."""
    clock = _Clock()
    monkeypatch.setattr(service_module, "time", clock)
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC, sha256=sha(OLD))  # S3: not_found, remembered for 10 s
    clock.ahead += 6
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC, sha256=sha(OLD))  # from memory
    env.fetcher.put(BUCKET, KEY, OLD)  # the teacher uploads it
    clock.ahead += 6  # 12 s after S3's answer
    assert "miss" == env.service.resolve(SRC, sha256=sha(OLD)).cache


def test_pin_try_hit_answers_from_memory(env: Env) -> None:
    """The event-loop fast path serves a pinned hit too, even when the key is not fresh."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    assert None is env.service.try_hit(SRC)  # revalidate_after_s = 0: never fresh
    hit = env.service.try_hit(SRC, sha256=sha(OLD))
    assert hit is not None
    assert ("hit", sha(OLD)) == (hit.cache, hit.sha256)


def test_wrong_pin_is_content_mismatch_after_fetch(env: Env) -> None:
    """A pin the object does not match: content_mismatch naming both digests, no path."""
    env.fetcher.put(BUCKET, KEY, NEW)
    with pytest.raises(errors.ContentMismatch) as info:
        env.service.resolve(SRC, sha256=sha(OLD))
    assert errors.ContentMismatch.for_digests(sha(OLD), sha(NEW)) == info.value
    assert {"content_mismatch": 1} == env.service.snapshot()[1]


def test_pin_to_new_content_revalidates_a_fresh_entry(make_env: Callable[..., Env]) -> None:
    """Within the revalidation window, a pin to content S3 now holds asks S3 and gets it."""
    env = make_env(cache={"revalidate_after_s": 3600.0})
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    env.fetcher.put(BUCKET, KEY, NEW)
    assert sha(OLD) == env.service.resolve(SRC).sha256  # unpinned: still the fresh old copy
    pinned = env.service.resolve(SRC, sha256=sha(NEW))
    assert ("miss", NEW) == (pinned.cache, pinned.path.read_bytes())


def test_wrong_pin_never_served_stale(env: Env) -> None:
    """S3 down and the cached copy is other content: the pinned request fails, not stale."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    env.fetcher.faults.get.extend([errors.Unavailable("down")] * 10)
    assert "stale" == env.service.resolve(SRC).cache
    with pytest.raises(errors.Unavailable):
        env.service.resolve(SRC, sha256=sha(NEW))


def test_pin_with_version_only_that_version(make_env: Callable[..., Env]) -> None:
    """With a version_id, only that version's row counts; another version's bytes are a mismatch."""
    env = make_env()
    v1 = env.fetcher.put(BUCKET, KEY, OLD, versioned=True)
    v2 = env.fetcher.put(BUCKET, KEY, NEW, versioned=True)
    env.service.resolve(SRC, v1.version_id)
    env.service.resolve(SRC, v2.version_id)
    before = _requests(env)
    assert "hit" == env.service.resolve(SRC, v1.version_id, sha256=sha(OLD)).cache
    with pytest.raises(errors.ContentMismatch):
        env.service.resolve(SRC, v2.version_id, sha256=sha(OLD))
    assert before == _requests(env)  # a version is immutable: no S3 request either way


def test_pin_for_blob_only_another_key_has_is_fetched(env: Env) -> None:
    """The same bytes cached under another key do not prove this key's content: it is fetched."""
    other = f"s3://{BUCKET}/datasets/copy.csv"
    env.fetcher.put(BUCKET, "datasets/copy.csv", OLD)
    env.service.resolve(other)
    env.fetcher.put(BUCKET, KEY, NEW)
    with pytest.raises(errors.ContentMismatch):
        env.service.resolve(SRC, sha256=sha(OLD))
    assert 2 == _requests(env)["get"]  # this key was downloaded, not answered from the other


def test_bad_pin_is_bad_request(env: Env) -> None:
    """sha256 must be 64 lowercase hex; None is no pin."""
    env.fetcher.put(BUCKET, KEY, OLD)
    for bad in ("A" * 64, "a" * 63, 5, "", ["a" * 64]):
        with pytest.raises(errors.BadRequest):
            env.service.resolve(SRC, sha256=bad)
    assert "miss" == env.service.resolve(SRC, sha256=None).cache


def test_old_rows_survive_refetch_until_eviction(env: Env) -> None:
    """After an overwrite, both contents are index entries; eviction removes the old one."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.resolve(SRC)
    env.fetcher.put(BUCKET, KEY, NEW)
    env.service.resolve(SRC)
    assert (2, len(OLD) + len(NEW)) == env.store.totals()
    env.store.evict(max_bytes=len(NEW), min_free_bytes=0, now=float("inf"))
    assert None is env.store.lookup_content(BUCKET, KEY, sha(OLD), None)


# --- asset:// aliases ------------------------------------------------------------------------


def _catalog(*entries: CatalogEntry) -> Catalog:
    return Catalog("catalog.toml", {e.name: e for e in entries})


def test_alias_resolves_to_its_source(env: Env) -> None:
    """asset://name answers with source as requested and resolved_source; single-flight shared."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.set_catalog(_catalog(CatalogEntry("tp2/data", S3Source(BUCKET, KEY))))
    res = env.service.resolve("asset://tp2/data")
    assert ("asset://tp2/data", SRC, "miss") == (res.source, res.resolved_source, res.cache)
    direct = env.service.resolve(SRC)
    assert (None, res.path) == (direct.resolved_source, direct.path)
    assert {"tp2/data": {"resolved_source": SRC, "resolves": 1}} == env.service.alias_counts()


def test_alias_without_catalog_is_unsupported_scheme(env: Env) -> None:
    """No catalog configured: asset:// is unsupported_scheme."""
    with pytest.raises(errors.UnsupportedScheme):
        env.service.resolve("asset://tp2/data")


def test_unknown_alias_is_not_found_and_not_cached(env: Env) -> None:
    """An unknown name is not_found, and works as soon as a new catalog has it."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.set_catalog(_catalog())
    with pytest.raises(errors.NotFound):
        env.service.resolve("asset://tp2/data")
    env.service.set_catalog(_catalog(CatalogEntry("tp2/data", S3Source(BUCKET, KEY))))
    assert SRC == env.service.resolve("asset://tp2/data").resolved_source
    assert {"get": 1} == _requests(env)  # one GET for the alias; the not_found asked S3 nothing


def test_alias_policy_applies_to_its_source(make_env: Callable[..., Env]) -> None:
    """An alias whose source is outside the allowlists is not_allowed, before any S3 request."""
    env = make_env(s3={"allowed_buckets": ("elsewhere",)})
    env.fetcher.put(BUCKET, KEY, OLD)
    env.service.set_catalog(_catalog(CatalogEntry("tp2/data", S3Source(BUCKET, KEY))))
    with pytest.raises(errors.NotAllowed):
        env.service.resolve("asset://tp2/data")
    assert {} == _requests(env)


def test_alias_pins_and_request_agreement(env: Env) -> None:
    """The entry's sha256 pins the alias; a request may repeat but not contradict its pins."""
    env.fetcher.put(BUCKET, KEY, NEW)
    pinned = CatalogEntry("tp2/data", S3Source(BUCKET, KEY), sha256=sha(OLD))
    env.service.set_catalog(_catalog(pinned, CatalogEntry("free", S3Source(BUCKET, KEY))))
    with pytest.raises(errors.ContentMismatch):
        env.service.resolve("asset://tp2/data")
    with pytest.raises(errors.ContentMismatch):
        env.service.resolve("asset://tp2/data", sha256=sha(OLD))
    with pytest.raises(errors.BadRequest):
        env.service.resolve("asset://tp2/data", sha256=sha(NEW))
    with pytest.raises(errors.BadRequest):
        env.service.resolve("asset://free", "v1")
    assert "hit" == env.service.resolve("asset://free", sha256=sha(NEW)).cache


def test_alias_counts_dropped_for_removed_names(env: Env) -> None:
    """A reload that removes or repoints a name drops its count: labels stay bounded."""
    env.fetcher.put(BUCKET, KEY, OLD)
    env.fetcher.put(BUCKET, "datasets/b.csv", NEW)
    env.service.set_catalog(
        _catalog(CatalogEntry("a", S3Source(BUCKET, KEY)), CatalogEntry("b", S3Source(BUCKET, KEY)))
    )
    env.service.resolve("asset://a")
    env.service.resolve("asset://b")
    env.service.set_catalog(_catalog(CatalogEntry("b", S3Source(BUCKET, "datasets/b.csv"))))
    assert {} == env.service.alias_counts()
