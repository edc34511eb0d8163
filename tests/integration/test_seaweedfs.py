"""Against SeaweedFS, the real S3 engine: credentials enforced, real multipart ETags."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from assetd import errors
from assetd.config import Config, S3Config, load_config
from assetd.fetcher.s3 import S3Fetcher
from assetd.service import AssetService
from assetd.store import Store
from tests.support.seaweedfs import ADMIN_KEY, READER_KEY, SeaweedFS, clean_env, ensure_bucket

pytestmark = pytest.mark.integration
BUCKET = "autograder-assets"


@pytest.fixture(scope="module")
def bucket(seaweedfs: SeaweedFS) -> Any:
    client = seaweedfs.client()
    ensure_bucket(client, BUCKET)
    return client


def _config(weed: SeaweedFS, cache: Path) -> Config:
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(cache)})
    s3 = S3Config(endpoint_url=weed.endpoint_url, region="us-east-1", addressing_style="path")
    return replace(cfg, s3=s3)


def _service(weed: SeaweedFS, cache: Path, key: tuple[str, str] = READER_KEY) -> AssetService:
    cfg = _config(weed, cache)
    session = boto3.session.Session(aws_access_key_id=key[0], aws_secret_access_key=key[1])
    return AssetService(cfg, S3Fetcher(cfg.s3, session=session), Store(cfg.cache.dir))


def test_wrong_keys_are_access_denied(seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path) -> None:
    """Credentials SeaweedFS does not know get access_denied, with no retries."""
    bucket.put_object(Bucket=BUCKET, Key="datasets/denied.csv", Body=b"a,b\n")
    service = _service(seaweedfs, tmp_path, key=("nobody", "wrong-secret"))
    try:
        with pytest.raises(errors.AccessDenied):
            service.resolve(f"s3://{BUCKET}/datasets/denied.csv")
        assert {"get": 1} == dict(service.fetcher.requests)
    finally:
        service.close()


def test_multipart_object_verified_by_sha256(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path
) -> None:
    """A multipart upload (ETag ending -N) is fetched, hashed and then served as a hit."""
    data = os.urandom(12 << 20)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    bucket.upload_file(str(src), BUCKET, "datasets/multi.bin", Config=cfg)
    etag = bucket.head_object(Bucket=BUCKET, Key="datasets/multi.bin")["ETag"]
    assert etag.strip('"').endswith("-3")
    service = _service(seaweedfs, tmp_path / "cache")
    try:
        first = service.resolve(f"s3://{BUCKET}/datasets/multi.bin")
        second = service.resolve(f"s3://{BUCKET}/datasets/multi.bin")
    finally:
        service.close()
    assert (hashlib.sha256(data).hexdigest(), "miss") == (first.sha256, first.cache)
    assert data == first.path.read_bytes()
    assert ("hit", first.path) == (second.cache, second.path)


def test_missing_key_with_list_rights_is_not_found(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path
) -> None:
    """With List rights, SeaweedFS reports a missing key as 404: not_found, not access_denied."""
    bucket.put_object(Bucket=BUCKET, Key="datasets/missing-ok.csv", Body=b"x")
    service = _service(seaweedfs, tmp_path)
    try:
        with pytest.raises(errors.NotFound):
            service.resolve(f"s3://{BUCKET}/datasets/does-not-exist.csv")
    finally:
        service.close()


def _check(
    weed: SeaweedFS, tmp_path: Path, source: str, key: tuple[str, str]
) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "assetd.toml"
    conf.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
        f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
    )
    env = clean_env(AWS_ACCESS_KEY_ID=key[0], AWS_SECRET_ACCESS_KEY=key[1])
    return subprocess.run(
        [sys.executable, "-m", "assetd", "check", source, "--config", str(conf), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_cli_fetches_into_the_cache(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path
) -> None:
    """`assetd check` in a real subprocess reports credentials, HEAD and the cached path."""
    body = b"name,rating\nLa Tasca,4\n"
    bucket.put_object(Bucket=BUCKET, Key="datasets/tp2/R.CSV", Body=body)
    proc = _check(seaweedfs, tmp_path, f"s3://{BUCKET}/datasets/tp2/R.CSV", READER_KEY)
    assert 0 == proc.returncode, proc.stderr
    report = json.loads(proc.stdout)
    assert ("env", "allowed", "size+md5") == (
        report["credentials"],
        report["policy"],
        report["head"]["verify"],
    )
    assert body == Path(report["result"]["path"]).read_bytes()
    assert secret_free(proc.stdout + proc.stderr)


def test_check_cli_reports_denied_and_policy(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path
) -> None:
    """`assetd check` exits 1 with the stable code for denied keys and for policy refusals."""
    denied = _check(seaweedfs, tmp_path, f"s3://{BUCKET}/datasets/tp2/R.CSV", ("bad", "worse"))
    refused = _check(seaweedfs, tmp_path, "s3://other-bucket/x.csv", READER_KEY)
    assert (1, "access_denied") == (denied.returncode, json.loads(denied.stdout)["error"]["code"])
    assert (1, "not_allowed") == (refused.returncode, json.loads(refused.stdout)["error"]["code"])


def secret_free(text: str) -> bool:
    return all(secret not in text for secret in (READER_KEY[1], ADMIN_KEY[1], "worse"))


@pytest.mark.parametrize("kind", ["plain-md5", "crc64nvme-multipart"])
def test_corrupted_body_of_same_length_is_never_cached(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path, kind: str
) -> None:
    """A body flipped in transit (same length) fails verification: integrity, nothing cached.

    SeaweedFS 4.48 stores a full-object CRC64NVME for a multipart upload made
    with ChecksumAlgorithm=CRC64NVME and returns it on HEAD with
    x-amz-checksum-mode; the ETag (-N) gives no MD5, so that CRC is the only check.
    """
    from tests.support.faultproxy import FaultProxy

    key = f"datasets/corrupt-{kind}.bin"
    data = os.urandom(11 << 20 if kind != "plain-md5" else 300_000)
    if kind == "plain-md5":
        bucket.put_object(Bucket=BUCKET, Key=key, Body=data)
    else:
        src = tmp_path / "src.bin"
        src.write_bytes(data)
        cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
        bucket.upload_file(
            str(src), BUCKET, key, Config=cfg, ExtraArgs={"ChecksumAlgorithm": "CRC64NVME"}
        )
        head = bucket.head_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        assert ("FULL_OBJECT", True) == (head.get("ChecksumType"), "ChecksumCRC64NVME" in head)
    proxy = FaultProxy(int(seaweedfs.endpoint_url.rsplit(":", 1)[1])).start()
    try:
        proxy.add(method="GET", corrupt=1000)
        cfg = _config(seaweedfs, tmp_path / "cache")
        cfg = replace(cfg, s3=replace(cfg.s3, endpoint_url=proxy.url, max_attempts=2))
        session = boto3.session.Session(
            aws_access_key_id=READER_KEY[0], aws_secret_access_key=READER_KEY[1]
        )
        service = AssetService(cfg, S3Fetcher(cfg.s3, session=session), Store(cfg.cache.dir))
        try:
            with pytest.raises(errors.IntegrityError):
                service.resolve(f"s3://{BUCKET}/{key}")
            assert None is service.store.lookup(BUCKET, key, None)
            blobs = [p for p in Path(cfg.cache.dir, "blobs").rglob("*") if p.is_file()]
            assert [] == blobs
            proxy.rules.clear()  # the path is clean again: the true bytes are cached
            assert (
                hashlib.sha256(data).hexdigest() == service.resolve(f"s3://{BUCKET}/{key}").sha256
            )
        finally:
            service.close()
            service.store.close()
    finally:
        proxy.stop()


def test_empty_object_is_fetched(seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path) -> None:
    """An empty object (no byte 0 for the first part's range) resolves to an empty blob."""
    bucket.put_object(Bucket=BUCKET, Key="datasets/empty.csv", Body=b"")
    service = _service(seaweedfs, tmp_path / "cache")
    try:
        res = service.resolve(f"s3://{BUCKET}/datasets/empty.csv")
    finally:
        service.close()
    assert (0, hashlib.sha256(b"").hexdigest(), b"") == (
        res.size,
        res.sha256,
        res.path.read_bytes(),
    )


def test_check_cli_beside_an_owner_uses_a_scratch_cache(
    seaweedfs: SeaweedFS, bucket: Any, tmp_path: Path
) -> None:
    """`assetd check` while a daemon owns the cache fetches into a scratch dir, not the cache."""
    from assetd.store import Store

    body = b"name,rating\nScratch,5\n"
    bucket.put_object(Bucket=BUCKET, Key="datasets/tp2/S.CSV", Body=body)
    owner = Store(tmp_path / "cache", lock=True)
    try:
        proc = _check(seaweedfs, tmp_path, f"s3://{BUCKET}/datasets/tp2/S.CSV", READER_KEY)
        blobs = list((tmp_path / "cache" / "blobs" / "sha256").glob("*/*"))
    finally:
        owner.close()
    assert 0 == proc.returncode, proc.stderr
    report = json.loads(proc.stdout)
    assert ("scratch", "miss", []) == (report["cache"], report["result"]["cache"], blobs)
