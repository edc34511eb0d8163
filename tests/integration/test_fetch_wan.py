"""Round trips and connections as a WAN client sees them (issue 10), on SeaweedFS.

A shaping proxy (10 ms each way, 40 MB/s per connection, a round trip per new
connection) counts every request per object; a fault proxy closes kept-alive
connections that idle, as S3 does. The one-request and idle tests failed on
the pre-issue-10 fetcher (a HEAD, then one whole GET).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest

from assetd.config import S3Config, load_config
from assetd.fetcher.s3 import S3Fetcher
from assetd.service import AssetService
from assetd.store import Store
from tests.support.faultproxy import FaultProxy
from tests.support.seaweedfs import ADMIN_KEY, SeaweedFS, ensure_bucket
from tests.support.shapeproxy import PROFILES, ShapingProxy

pytestmark = pytest.mark.integration
BUCKET = "wan-assets"
MIB = 1 << 20
SMALL = os.urandom(100 * 1024)  # no bigger than one part, whatever the part size
LARGE = os.urandom(20 * MIB)


@pytest.fixture(scope="module")
def s3(seaweedfs: SeaweedFS) -> Any:
    client = seaweedfs.client()
    ensure_bucket(client, BUCKET)
    client.put_object(Bucket=BUCKET, Key="small.bin", Body=SMALL)
    client.put_object(Bucket=BUCKET, Key="large.bin", Body=LARGE)
    for n in range(12):
        client.put_object(Bucket=BUCKET, Key=f"many/{n}.bin", Body=SMALL[: 1000 + n])
    return client


def _service(endpoint: str, cache: Path, **s3: Any) -> AssetService:
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(cache)})
    s3_cfg = S3Config(endpoint_url=endpoint, region="us-east-1", addressing_style="path", **s3)
    # revalidate on every resolve; a failed revalidation is an error, not a stale answer
    cache_cfg = replace(cfg.cache, revalidate_after_s=0, serve_stale_on_error=False)
    cfg = replace(cfg, s3=s3_cfg, cache=cache_cfg)
    session = boto3.session.Session(
        aws_access_key_id=ADMIN_KEY[0], aws_secret_access_key=ADMIN_KEY[1]
    )
    return AssetService(cfg, S3Fetcher(s3_cfg, session=session), Store(cache))


@pytest.fixture
def wan(
    seaweedfs: SeaweedFS, s3: Any, tmp_path: Path
) -> Iterator[tuple[ShapingProxy, AssetService]]:
    with ShapingProxy(("127.0.0.1", seaweedfs.ports["s3"]), PROFILES["wan"]) as proxy:
        service = _service(proxy.url, tmp_path / "cache")
        try:
            yield proxy, service
        finally:
            service.close()


def test_small_cold_fetch_is_one_get(wan: tuple[ShapingProxy, AssetService]) -> None:
    """An object no bigger than one part costs exactly one request: a GET."""
    proxy, service = wan
    got = service.resolve(f"s3://{BUCKET}/small.bin")
    assert (hashlib.sha256(SMALL).hexdigest(), "miss") == (got.sha256, got.cache)
    assert {"GET": 1} == dict(proxy.methods("/small.bin"))


def test_unchanged_revalidation_is_one_request(wan: tuple[ShapingProxy, AssetService]) -> None:
    """Revalidating an unchanged object costs exactly one conditional request."""
    proxy, service = wan
    service.resolve(f"s3://{BUCKET}/small.bin")
    proxy.reset()
    again = service.resolve(f"s3://{BUCKET}/small.bin")
    assert "hit" == again.cache
    seen = [r for r in proxy.requests if "/small.bin" in r.path]
    assert 1 == len(seen), [r.method for r in seen]
    assert "if-none-match" in seen[0].headers


def test_changed_small_object_revalidates_in_one_request(
    wan: tuple[ShapingProxy, AssetService], s3: Any
) -> None:
    """A changed object's new bytes come back in the conditional request itself."""
    proxy, service = wan
    s3.put_object(Bucket=BUCKET, Key="changing.bin", Body=b"old" * 100)
    service.resolve(f"s3://{BUCKET}/changing.bin")
    s3.put_object(Bucket=BUCKET, Key="changing.bin", Body=b"new" * 100)
    proxy.reset()
    got = service.resolve(f"s3://{BUCKET}/changing.bin")
    assert ("miss", b"new" * 100) == (got.cache, got.path.read_bytes())
    assert 1 == proxy.count(path="/changing.bin")


def test_large_object_through_the_wan_is_byte_exact(
    wan: tuple[ShapingProxy, AssetService],
) -> None:
    """20 MiB over shaped connections arrives exactly; every request after the first is pinned."""
    proxy, service = wan
    got = service.resolve(f"s3://{BUCKET}/large.bin")
    assert LARGE == got.path.read_bytes()
    seen = sorted((r for r in proxy.requests if "/large.bin" in r.path), key=lambda r: r.at)
    assert seen and all(r.method in ("GET", "HEAD") for r in seen)
    # the first request learns the ETag; every later one is pinned to it
    pinned = [bool(r.headers.get("if-match") or "versionid=" in r.target.lower()) for r in seen]
    assert [True] * (len(seen) - 1) == pinned[1:]
    assert len({r.headers["if-match"] for r in seen[1:] if "if-match" in r.headers}) <= 1


def test_capped_connections_get_every_connection(
    wan: tuple[ShapingProxy, AssetService],
) -> None:
    """Through 40 MB/s connections the first response is slow: the rest uses all sixteen."""
    proxy, service = wan
    service.resolve(f"s3://{BUCKET}/large.bin")
    conns = {r.conn for r in proxy.requests if "/large.bin" in r.path and r.method == "GET"}
    assert 16 == len(conns)


def test_fast_first_response_keeps_to_two_connections(
    seaweedfs: SeaweedFS, s3: Any, tmp_path: Path
) -> None:
    """Unshaped, the first response is fast: the rest runs on two connections, in four parts."""
    with ShapingProxy(("127.0.0.1", seaweedfs.ports["s3"]), PROFILES["loopback"]) as proxy:
        service = _service(proxy.url, tmp_path / "cache")
        # 1 MiB within a second counts as fast, however loaded the test machine is
        service.fetcher.probe_window_s = 1.0
        try:
            got = service.resolve(f"s3://{BUCKET}/large.bin")
        finally:
            service.close()
    assert LARGE == got.path.read_bytes()
    gets = [r for r in proxy.requests if "/large.bin" in r.path and r.method == "GET"]
    assert (1 + 4, 2) == (len(gets), len({r.conn for r in gets}))


def test_connections_closed_by_the_server_after_idle_are_replaced(
    seaweedfs: SeaweedFS, s3: Any, tmp_path: Path
) -> None:
    """After the server closed every idle kept-alive connection, resolves still succeed."""
    proxy = FaultProxy(seaweedfs.ports["s3"], idle_close=1.0).start()
    service = _service(proxy.url, tmp_path / "cache", max_attempts=5)
    try:
        keys = [f"s3://{BUCKET}/many/{n}.bin" for n in range(12)]
        with ThreadPoolExecutor(12) as pool:
            first = list(pool.map(service.resolve, keys))
        assert all(r.cache == "miss" for r in first)
        time.sleep(2.0)  # longer than the server's keep-alive timeout
        assert proxy.idle_closed >= 2
        outcomes = []
        for key in keys:  # each one revalidates (revalidate_after_s = 0)
            try:
                outcomes.append(service.resolve(key).cache)
            except Exception as exc:  # what is being counted
                outcomes.append(repr(exc))
        assert ["hit"] * len(keys) == outcomes
    finally:
        service.close()
        proxy.stop()
