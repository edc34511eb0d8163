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
        assert {"head": 1} == dict(service.fetcher.requests)
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
