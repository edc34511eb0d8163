"""Unit tests for assetd.service: resolve end to end over MemoryFetcher and a real Store."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from assetd import errors
from assetd.fetcher.base import PartResponse
from assetd.fetcher.memory import MemoryFetcher, StoredObject
from assetd.protocol import Resolved
from assetd.store import Hit, Store
from tests.support.service import Env

BUCKET = "autograder-assets"
KEY = "datasets/tp2/RESTAURANTES.CSV"
SRC = f"s3://{BUCKET}/{KEY}"
DATA = b"id,nome,nota\n1,Cantina,4.5\n2,Bistro,3.9\n"
WAIT = 5.0


@pytest.fixture
def env(make_env: Callable[..., Env]) -> Env:
    """An Env with default settings."""
    return make_env()


def _check_blob(env: Env, res: Resolved, data: bytes) -> None:
    digest = hashlib.sha256(data).hexdigest()
    assert Path(env.config.cache.dir) / "blobs" / "sha256" / digest[:2] / digest == res.path
    assert data == res.path.read_bytes()
    assert digest == res.sha256
    assert len(data) == res.size


def test_miss_then_hit(env: Env) -> None:
    """The first resolve downloads (miss), the second is served from the cache (hit)."""
    obj = env.fetcher.put(BUCKET, KEY, DATA)
    first = env.service.resolve(SRC)
    assert "miss" == first.cache
    assert SRC == first.source
    assert obj.etag == first.etag
    assert None is first.version_id
    _check_blob(env, first, DATA)
    second = env.service.resolve(SRC)
    assert "hit" == second.cache
    assert first.path == second.path
    assert first.sha256 == second.sha256
    assert {"get": 1} == dict(env.fetcher.requests)


def test_bytes_on_disk_equal_object(env: Env) -> None:
    """The blob on disk is byte-for-byte the object, read-only."""
    data = os.urandom(3 * (1 << 20) + 5)
    env.fetcher.put(BUCKET, "big.bin", data)
    res = env.service.resolve(f"s3://{BUCKET}/big.bin")
    _check_blob(env, res, data)
    assert 0o444 == os.stat(res.path).st_mode & 0o777


def test_resolved_to_dict(env: Env) -> None:
    """Resolved.to_dict has the wire fields of a resolve success."""
    env.fetcher.put(BUCKET, KEY, DATA)
    res = env.service.resolve(SRC)
    d = res.to_dict()
    assert {
        "source",
        "path",
        "size",
        "sha256",
        "etag",
        "version_id",
        "cache",
        "pinned_until",
    } == set(d)
    assert str(res.path) == d["path"]
    assert "miss" == d["cache"]


def test_pinned_for_pin_seconds(make_env: Callable[..., Env]) -> None:
    """resolve pins the entry for cache.pin_seconds from now."""
    env = make_env(cache={"pin_seconds": 500.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    before = time.time()
    res = env.service.resolve(SRC)
    assert before + 500.0 <= res.pinned_until <= time.time() + 500.0
    hit = env.service.resolve(SRC)
    assert res.pinned_until <= hit.pinned_until


def test_versioned_resolve(env: Env) -> None:
    """A version_id gets that version's bytes; no version gets the latest."""
    v1 = env.fetcher.put(BUCKET, KEY, b"first version", versioned=True)
    v2 = env.fetcher.put(BUCKET, KEY, b"second version", versioned=True)
    old = env.service.resolve(SRC, version_id=v1.version_id)
    assert "miss" == old.cache
    assert v1.version_id == old.version_id
    _check_blob(env, old, b"first version")
    latest = env.service.resolve(SRC)
    assert v2.version_id == latest.version_id
    _check_blob(env, latest, b"second version")
    again = env.service.resolve(SRC, version_id=v1.version_id)
    assert "hit" == again.cache
    assert old.path == again.path


def test_version_never_revalidated(make_env: Callable[..., Env]) -> None:
    """A version_id is immutable: even with revalidate_after_s=0 a hit sends nothing."""
    env = make_env(cache={"revalidate_after_s": 0.0})
    v1 = env.fetcher.put(BUCKET, KEY, DATA, versioned=True)
    env.service.resolve(SRC, version_id=v1.version_id)
    sent = sum(env.fetcher.requests.values())
    assert "hit" == env.service.resolve(SRC, version_id=v1.version_id).cache
    assert sent == sum(env.fetcher.requests.values())


def test_not_found(env: Env) -> None:
    """A missing object raises NotFound and counts it."""
    with pytest.raises(errors.NotFound) as info:
        env.service.resolve(SRC)
    assert "not_found" == info.value.code
    assert False is info.value.retryable
    assert 1 == env.service.errors["not_found"]
    assert {"get": 1} == dict(env.fetcher.requests)


def test_unknown_version_not_found(env: Env) -> None:
    """An unknown version of an existing object is NotFound."""
    env.fetcher.put(BUCKET, KEY, DATA, versioned=True)
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC, version_id="no-such-version")


@pytest.mark.parametrize(
    ("s3", "source"),
    [
        ({"allowed_buckets": ("other-bucket",)}, SRC),
        ({"allowed_prefixes": ("public/",)}, SRC),
        ({"allowed_prefixes": ("datasets/",)}, f"s3://{BUCKET}/datasets-private/x.csv"),
    ],
)
def test_policy_refusal_makes_no_request(
    make_env: Callable[..., Env], s3: dict[str, Any], source: str
) -> None:
    """A source outside the allowlists is NotAllowed before any HEAD or GET."""
    env = make_env(s3=s3)
    env.fetcher.put(BUCKET, KEY, DATA)
    env.fetcher.put(BUCKET, "datasets-private/x.csv", DATA)
    with pytest.raises(errors.NotAllowed):
        env.service.resolve(source)
    assert 0 == sum(env.fetcher.requests.values())
    assert 1 == env.service.errors["not_allowed"]


def test_allowed_source_passes_policy(make_env: Callable[..., Env]) -> None:
    """A source inside both allowlists resolves."""
    env = make_env(s3={"allowed_buckets": (BUCKET,), "allowed_prefixes": ("datasets/",)})
    env.fetcher.put(BUCKET, KEY, DATA)
    assert "miss" == env.service.resolve(SRC).cache


def test_invalid_bucket_is_malformed_even_if_allowlisted(make_env: Callable[..., Env]) -> None:
    """Parsing comes before policy: a bad bucket name is malformed_uri, no request."""
    env = make_env(s3={"allowed_buckets": ("Bad_Bucket",)})
    with pytest.raises(errors.MalformedURI):
        env.service.resolve("s3://Bad_Bucket/key")
    assert 0 == sum(env.fetcher.requests.values())
    assert 1 == env.service.errors["malformed_uri"]


def test_too_large_refused_after_first_get(make_env: Callable[..., Env]) -> None:
    """An object over s3.max_object_bytes is TooLarge after the first GET, with no other."""
    env = make_env(s3={"max_object_bytes": len(DATA) - 1})
    env.fetcher.put(BUCKET, KEY, DATA)
    with pytest.raises(errors.TooLarge):
        env.service.resolve(SRC)
    assert {"get": 1} == dict(env.fetcher.requests)
    assert 1 == env.service.errors["too_large"]
    assert [] == [p for p in Path(env.config.cache.dir, "blobs").rglob("*") if p.is_file()]


def test_size_equal_to_limit_allowed(make_env: Callable[..., Env]) -> None:
    """An object exactly at s3.max_object_bytes resolves."""
    env = make_env(s3={"max_object_bytes": len(DATA)})
    env.fetcher.put(BUCKET, KEY, DATA)
    assert len(DATA) == env.service.resolve(SRC).size


def test_lowered_limit_refuses_cached_hit(env: Env) -> None:
    """A cached object over a newly lowered limit is refused, not served."""
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    cfg = dataclasses.replace(env.config, s3=dataclasses.replace(env.config.s3, max_object_bytes=1))
    env.service.reconfigure(cfg)
    with pytest.raises(errors.TooLarge):
        env.service.resolve(SRC)


def test_reconfigure_applies_allowlist(env: Env) -> None:
    """reconfigure() makes a new allowlist apply to the next resolve, even for a cached hit."""
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    cfg = dataclasses.replace(
        env.config, s3=dataclasses.replace(env.config.s3, allowed_buckets=("elsewhere",))
    )
    env.service.reconfigure(cfg)
    with pytest.raises(errors.NotAllowed):
        env.service.resolve(SRC)


def test_retryable_fault_then_success(env: Env) -> None:
    """A retryable GET failure is retried inside the daemon; the resolve succeeds."""
    env.fetcher.put(BUCKET, KEY, DATA)
    env.fetcher.faults.get.append(errors.Unavailable("x"))
    res = env.service.resolve(SRC)
    assert "miss" == res.cache
    _check_blob(env, res, DATA)
    assert 2 == env.fetcher.requests["get"]
    assert 0 == sum(env.service.errors.values())


def test_retries_exhausted_unavailable(env: Env) -> None:
    """When every attempt fails with a retryable error, resolve raises Unavailable."""
    env.fetcher.put(BUCKET, KEY, DATA)
    attempts = env.fetcher.retry.max_attempts
    env.fetcher.faults.get.extend(errors.Unavailable("x") for _ in range(attempts))
    with pytest.raises(errors.Unavailable) as info:
        env.service.resolve(SRC)
    assert True is info.value.retryable
    assert attempts == env.fetcher.requests["get"]
    assert 1 == env.service.errors["unavailable"]
    assert [] == list(Path(env.config.cache.dir, "tmp").iterdir())


def test_access_denied_not_retried(env: Env) -> None:
    """A 403 from the first GET is AccessDenied at once."""
    env.fetcher.put(BUCKET, KEY, DATA)
    env.fetcher.faults.get.append(errors.AccessDenied("403"))
    with pytest.raises(errors.AccessDenied):
        env.service.resolve(SRC)
    assert {"get": 1} == dict(env.fetcher.requests)


def test_integrity_error_md5(env: Env) -> None:
    """Bytes that no longer match the MD5 ETag raise IntegrityError; nothing is cached."""
    obj = env.fetcher.put(BUCKET, KEY, DATA, checksum=True)
    obj.data = bytes(reversed(DATA))
    assert len(DATA) == len(obj.data)
    with pytest.raises(errors.IntegrityError):
        env.service.resolve(SRC)
    assert 1 == env.service.errors["integrity"]
    assert None is env.store.lookup(BUCKET, KEY, None)


def test_integrity_error_sha256(env: Env) -> None:
    """With no MD5 ETag, a SHA-256 checksum mismatch alone raises IntegrityError."""
    obj = env.fetcher.put(BUCKET, KEY, DATA, checksum=True)
    obj.etag = '"0123456789abcdef0123456789abcdef-2"'
    obj.data = bytes(reversed(DATA))
    with pytest.raises(errors.IntegrityError):
        env.service.resolve(SRC)
    assert [] == [p for p in Path(env.config.cache.dir, "blobs").rglob("*") if p.is_file()]


class ReplacingFetcher(MemoryFetcher):
    """Replaces the object right after the first GET, before the next part."""

    new_data = b"REPLACED: entirely different, and longer, content\n" * 50

    def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
        part = super()._get(bucket, key, version_id, **kw)
        if self.requests["get"] == 1:
            self.put(bucket, key, self.new_data)
        return part


def test_object_replaced_between_parts(make_env: Callable[..., Env]) -> None:
    """An object replaced mid-fetch (412 on the second part) yields the new content wholly."""
    env = make_env(fetcher=ReplacingFetcher(part_size=len(DATA) // 2))
    env.fetcher.put(BUCKET, KEY, DATA)
    res = env.service.resolve(SRC)
    _check_blob(env, res, ReplacingFetcher.new_data)
    assert env.fetcher.objects[(BUCKET, KEY)].etag == res.etag


def test_revalidation_notices_changed_object(make_env: Callable[..., Env]) -> None:
    """With revalidate_after_s=0 a changed object is fetched again and served new."""
    env = make_env(cache={"revalidate_after_s": 0.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    first = env.service.resolve(SRC)
    new = env.fetcher.put(BUCKET, KEY, b"updated dataset\n")
    second = env.service.resolve(SRC)
    assert "miss" == second.cache
    assert new.etag == second.etag
    _check_blob(env, second, b"updated dataset\n")
    assert first.path != second.path
    assert DATA == first.path.read_bytes()  # the old blob is never rewritten
    assert {"get": 2} == dict(env.fetcher.requests)  # the conditional GET was the new fetch


def test_revalidation_unchanged_is_hit(make_env: Callable[..., Env]) -> None:
    """With revalidate_after_s=0 an unchanged object costs one conditional GET (a 304)."""
    env = make_env(cache={"revalidate_after_s": 0.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    assert "hit" == env.service.resolve(SRC).cache
    assert {"get": 2} == dict(env.fetcher.requests)


def test_no_revalidation_within_window(make_env: Callable[..., Env]) -> None:
    """Within revalidate_after_s a hit sends nothing to S3, even if S3 changed."""
    env = make_env(cache={"revalidate_after_s": 3600.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    env.fetcher.put(BUCKET, KEY, b"changed")
    res = env.service.resolve(SRC)
    assert "hit" == res.cache
    assert DATA == res.path.read_bytes()
    assert {"get": 1} == dict(env.fetcher.requests)


def test_tampered_blob_is_refetched(env: Env) -> None:
    """A blob changed on disk is never served: the next resolve downloads it again."""
    env.fetcher.put(BUCKET, KEY, DATA)
    first = env.service.resolve(SRC)
    os.chmod(first.path, 0o644)
    first.path.write_bytes(b"evil" + DATA)
    second = env.service.resolve(SRC)
    assert "miss" == second.cache
    _check_blob(env, second, DATA)
    assert 2 == env.fetcher.requests["get"]


def test_stats_counters(env: Env) -> None:
    """hits, misses, bytes_fetched and errors by code are counted."""
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    env.service.resolve(SRC)
    env.service.resolve(SRC)
    for _ in range(2):
        with pytest.raises(errors.NotFound):
            env.service.resolve(f"s3://{BUCKET}/missing")
    with pytest.raises(errors.MalformedURI):
        env.service.resolve("s3://x/y")
    assert 2 == env.service.counters["hits"]
    assert 1 == env.service.counters["misses"]
    assert 0 == env.service.counters["coalesced"]
    assert len(DATA) == env.service.counters["bytes_fetched"]
    assert Counter({"not_found": 2, "malformed_uri": 1}) == env.service.errors


@pytest.mark.parametrize("version_id", ["", 5, ["v1"], "v\x00", "v\n1", "x" * 1025])
def test_bad_version_id_is_bad_request(env: Env, version_id: Any) -> None:
    """An empty, non-string, control-character or over-long version_id is BadRequest."""
    env.fetcher.put(BUCKET, KEY, DATA, versioned=True)
    with pytest.raises(errors.BadRequest):
        env.service.resolve(SRC, version_id=version_id)
    assert 0 == sum(env.fetcher.requests.values())
    assert 1 == env.service.errors["bad_request"]


@pytest.mark.parametrize("source", ["data/x.csv", "tp2/RESTAURANTES.CSV"])
def test_local_source_unsupported(env: Env, source: str) -> None:
    """The daemon answers unsupported_scheme for a local source."""
    with pytest.raises(errors.UnsupportedScheme):
        env.service.resolve(source)
    assert 1 == env.service.errors["unsupported_scheme"]


@pytest.mark.parametrize(
    ("source", "exc"),
    [
        ("", errors.MalformedURI),
        ("s3://bucket", errors.MalformedURI),
        ("https://example.com/a", errors.UnsupportedScheme),
        ("asset://x/y", errors.UnsupportedScheme),
    ],
)
def test_bad_source_no_request(env: Env, source: str, exc: type[Exception]) -> None:
    """Unparsable sources fail before any network call."""
    with pytest.raises(exc):
        env.service.resolve(source)
    assert 0 == sum(env.fetcher.requests.values())


def test_unexpected_exception_becomes_internal(make_env: Callable[..., Env]) -> None:
    """A bug in a fetcher surfaces as InternalError, counted as 'internal'."""

    class Buggy(MemoryFetcher):
        def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
            raise RuntimeError("bug")

    env = make_env(fetcher=Buggy())
    env.fetcher.put(BUCKET, KEY, DATA)
    with pytest.raises(errors.InternalError) as info:
        env.service.resolve(SRC)
    assert "bug" not in info.value.message
    assert 1 == env.service.errors["internal"]
    env.fetcher.__class__ = MemoryFetcher  # the daemon keeps serving
    assert "miss" == env.service.resolve(SRC).cache


class GatedFetcher(MemoryFetcher):
    """Every GET waits for ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def _get(self, bucket: str, key: str, version_id: str | None, **kw: Any) -> PartResponse:
        assert self.release.wait(WAIT)
        return super()._get(bucket, key, version_id, **kw)


class CountingStore(Store):
    """Counts index lookups so a test can tell when every request has passed them."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.lookups = 0
        self.cond = threading.Condition()

    def lookup(self, bucket: str, key: str, version_id: str | None) -> Hit | None:
        hit = super().lookup(bucket, key, version_id)
        with self.cond:
            self.lookups += 1
            self.cond.notify_all()
        return hit

    def wait_lookups(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.lookups >= n, timeout=WAIT)


def test_concurrent_resolves_share_one_download(make_env: Callable[..., Env]) -> None:
    """16 concurrent resolves of one object make one GET: 1 miss, 15 coalesced."""
    fetcher = GatedFetcher()
    env = make_env(fetcher=fetcher, store_cls=CountingStore)
    assert isinstance(env.store, CountingStore)
    fetcher.put(BUCKET, KEY, DATA)
    results: list[Resolved] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def call() -> None:
        barrier.wait(WAIT)
        try:
            res = env.service.resolve(SRC)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(res)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    env.store.wait_lookups(16)  # all 16 missed the index ...
    time.sleep(0.1)  # ... and went on into the single-flight (no I/O in between)
    fetcher.release.set()
    for t in threads:
        t.join(WAIT)
    assert [] == failures
    assert 1 == fetcher.requests["get"]
    assert Counter({"miss": 1, "coalesced": 15}) == Counter(r.cache for r in results)
    assert {results[0].path} == {r.path for r in results}
    assert DATA == results[0].path.read_bytes()
    assert 1 == env.service.counters["misses"]
    assert 15 == env.service.counters["coalesced"]


def test_caller_timeout_while_download_continues(make_env: Callable[..., Env]) -> None:
    """A caller whose timeout passes gets Timeout; the download still fills the cache."""
    fetcher = GatedFetcher()
    env = make_env(fetcher=fetcher)
    fetcher.put(BUCKET, KEY, DATA)
    with pytest.raises(errors.Timeout):
        env.service.resolve(SRC, timeout_s=0.05)
    assert 1 == env.service.errors["timeout"]
    fetcher.release.set()
    deadline = time.monotonic() + WAIT
    while env.store.lookup(BUCKET, KEY, None) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    res = env.service.resolve(SRC)
    assert res.cache in ("hit", "coalesced")
    _check_blob(env, res, DATA)
    assert 1 == fetcher.requests["get"]


def test_identical_content_two_keys_one_blob(env: Env) -> None:
    """Two keys with identical bytes resolve to the same blob path."""
    env.fetcher.put(BUCKET, "a.csv", DATA)
    env.fetcher.put(BUCKET, "copy/a.csv", DATA)
    a = env.service.resolve(f"s3://{BUCKET}/a.csv")
    b = env.service.resolve(f"s3://{BUCKET}/copy/a.csv")
    assert a.path == b.path
    assert 1 == len([p for p in Path(env.config.cache.dir, "blobs").rglob("*") if p.is_file()])


def test_empty_object(env: Env) -> None:
    """A zero-byte object resolves to an empty blob."""
    env.fetcher.put(BUCKET, "empty", b"")
    res = env.service.resolve(f"s3://{BUCKET}/empty")
    _check_blob(env, res, b"")


def test_serve_stale_on_error(make_env: Callable[..., Env]) -> None:
    """With serve_stale_on_error, an unreachable S3 on revalidation serves the cached copy."""
    env = make_env(cache={"revalidate_after_s": 0.0, "serve_stale_on_error": True})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    env.fetcher.faults.get.extend(
        errors.Unavailable("x") for _ in range(env.fetcher.retry.max_attempts)
    )
    before = time.time()
    res = env.service.resolve(SRC)
    assert "stale" == res.cache
    _check_blob(env, res, DATA)
    assert 1 == env.service.counters["stale"]
    assert 0 == sum(env.service.errors.values())
    assert before + env.config.cache.pin_seconds <= res.pinned_until


def test_no_stale_when_disabled(make_env: Callable[..., Env]) -> None:
    """With serve_stale_on_error off, an unreachable S3 on revalidation is Unavailable."""
    env = make_env(cache={"revalidate_after_s": 0.0, "serve_stale_on_error": False})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.service.resolve(SRC)
    env.fetcher.faults.get.extend(
        errors.Unavailable("x") for _ in range(env.fetcher.retry.max_attempts)
    )
    with pytest.raises(errors.Unavailable):
        env.service.resolve(SRC)


def test_not_found_is_cached_briefly(make_env: Callable[..., Env]) -> None:
    """Within negative_ttl_s a second resolve of a missing object sends no request."""
    env = make_env(cache={"negative_ttl_s": 60.0})
    for _ in range(2):
        with pytest.raises(errors.NotFound):
            env.service.resolve(SRC)
    assert 1 == env.fetcher.requests["get"]
    assert 2 == env.service.errors["not_found"]


def test_negative_cache_message_is_deterministic(make_env: Callable[..., Env]) -> None:
    """A cached not_found answers with the same message as the first one."""
    env = make_env(cache={"negative_ttl_s": 60.0})
    messages = []
    for _ in range(2):
        with pytest.raises(errors.NotFound) as info:
            env.service.resolve(SRC)
        messages.append(info.value.to_dict())
    assert messages[0] == messages[1]


def test_negative_cache_is_per_object(make_env: Callable[..., Env]) -> None:
    """A cached not_found hides only that exact key and version, not others."""
    env = make_env(cache={"negative_ttl_s": 60.0})
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC)
    env.fetcher.put(BUCKET, "other.csv", DATA)
    assert "miss" == env.service.resolve(f"s3://{BUCKET}/other.csv").cache
    obj = env.fetcher.put(BUCKET, KEY, DATA, versioned=True)
    with pytest.raises(errors.NotFound):  # still within the TTL for this exact key
        env.service.resolve(SRC)
    assert "miss" == env.service.resolve(SRC, version_id=obj.version_id).cache


def test_access_denied_is_cached_briefly(make_env: Callable[..., Env]) -> None:
    """Within negative_ttl_s a second resolve after a 403 sends no request."""
    env = make_env(cache={"negative_ttl_s": 60.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.fetcher.faults.get.append(errors.AccessDenied("403"))
    for _ in range(2):
        with pytest.raises(errors.AccessDenied):
            env.service.resolve(SRC)
    assert 1 == env.fetcher.requests["get"]


def test_transient_errors_are_not_negative_cached(make_env: Callable[..., Env]) -> None:
    """An unavailable answer is not cached: the next resolve asks S3 again."""
    env = make_env(cache={"negative_ttl_s": 60.0})
    env.fetcher.put(BUCKET, KEY, DATA)
    env.fetcher.faults.get.extend(
        errors.Unavailable("x") for _ in range(env.fetcher.retry.max_attempts)
    )
    with pytest.raises(errors.Unavailable):
        env.service.resolve(SRC)
    assert "miss" == env.service.resolve(SRC).cache


def test_negative_ttl_zero_disables_cache(make_env: Callable[..., Env]) -> None:
    """With negative_ttl_s=0 every resolve of a missing object asks S3."""
    env = make_env(cache={"negative_ttl_s": 0.0})
    for _ in range(2):
        with pytest.raises(errors.NotFound):
            env.service.resolve(SRC)
    assert 2 == env.fetcher.requests["get"]


def test_negative_cache_expires(make_env: Callable[..., Env]) -> None:
    """After negative_ttl_s has passed, S3 is asked again and a new object is found."""
    env = make_env(cache={"negative_ttl_s": 0.05})
    with pytest.raises(errors.NotFound):
        env.service.resolve(SRC)
    env.fetcher.put(BUCKET, KEY, DATA)
    time.sleep(0.1)
    assert "miss" == env.service.resolve(SRC).cache


def _put_null_version(fetcher: MemoryFetcher, data: bytes) -> None:
    """What S3 does for a bucket with versioning suspended: the write replaces version "null"."""
    obj = StoredObject(data=data, etag=f'"{hashlib.md5(data).hexdigest()}"', version_id="null")  # noqa: S324
    fetcher.objects[(BUCKET, KEY)] = obj
    fetcher.versions[(BUCKET, KEY, "null")] = obj


def test_null_version_is_revalidated_after_an_overwrite(make_env: Callable[..., Env]) -> None:
    """version_id "null" is overwritable: revalidated, never served stale (issue 11, Why 7)."""
    env = make_env(cache={"revalidate_after_s": 0.0})
    _put_null_version(env.fetcher, b"first contents")
    first = env.service.resolve(SRC, version_id="null")
    _put_null_version(env.fetcher, b"second contents")
    second = env.service.resolve(SRC, version_id="null")
    assert "miss" == second.cache
    assert b"second contents" == second.path.read_bytes()
    assert first.sha256 != second.sha256


def test_null_version_hit_within_revalidate_after_s(make_env: Callable[..., Env]) -> None:
    """An unchanged "null" version is re-checked once per revalidate_after_s, like no version."""
    env = make_env(cache={"revalidate_after_s": 3600.0})
    _put_null_version(env.fetcher, b"contents")
    env.service.resolve(SRC, version_id="null")
    heads = env.fetcher.requests["head"]
    assert "hit" == env.service.resolve(SRC, version_id="null").cache
    assert heads == env.fetcher.requests["head"]
