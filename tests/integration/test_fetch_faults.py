"""Hostile responses between assetd and a real S3 engine (issue 10).

A fault proxy sits in front of SeaweedFS (or moto, where SeaweedFS cannot
store the object: see below) and corrupts, trickles, resets or misframes
responses. Whatever happens, bad bytes are never cached or served, and every
failure reaches the caller as a stable, retryable code in bounded time.
Several of these failed on the pre-issue-10 fetcher (see docs/performance.md).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from assetd import errors
from assetd.config import S3Config, load_config
from assetd.fetcher.s3 import S3Fetcher
from assetd.service import AssetService
from assetd.store import Store
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.seaweedfs import ADMIN_KEY, SeaweedFS, ensure_bucket

pytestmark = pytest.mark.integration
BUCKET = "fault-assets"
MIB = 1 << 20
CORRUPT_AT = 1000  # inside the first part of any ranged or whole GET


@dataclass(frozen=True)
class Obj:
    """One stored object and the engine (endpoint port) that holds it."""

    key: str
    data: bytes
    port: int
    key_pair: tuple[str, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def corrupted_sha256(self) -> str:
        bad = bytearray(self.data)
        bad[CORRUPT_AT] ^= 0xFF
        return hashlib.sha256(bad).hexdigest()


def _multipart(client: Any, path: Path, key: str, **extra: Any) -> None:
    cfg = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    client.upload_file(str(path), BUCKET, key, Config=cfg, ExtraArgs=extra or None)


@pytest.fixture(scope="module")
def objects(
    seaweedfs: SeaweedFS, moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Obj]:
    """A plain-MD5 object, a multipart full-object SHA-256 one and a multipart CRC64NVME one."""
    weed = seaweedfs.client()
    ensure_bucket(weed, BUCKET)
    src = tmp_path_factory.mktemp("src") / "mp.bin"
    plain = os.urandom(300 * 1024)
    weed.put_object(Bucket=BUCKET, Key="plain.bin", Body=plain)
    crc = os.urandom(11 * MIB)
    src.write_bytes(crc)
    _multipart(weed, src, "crc64.bin", ChecksumAlgorithm="CRC64NVME")
    head = weed.head_object(Bucket=BUCKET, Key="crc64.bin", ChecksumMode="ENABLED")
    assert (True, "FULL_OBJECT") == (head["ETag"].endswith('-3"'), head.get("ChecksumType"))
    assert "ChecksumCRC64NVME" in head and "ChecksumSHA256" not in head
    # SeaweedFS (like AWS) refuses a full-object SHA-256 for a multipart upload;
    # moto stores one, so this case runs on moto.
    moto = boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    ensure_bucket(moto, BUCKET)
    sha = os.urandom(11 * MIB)
    digest = hashlib.sha256(sha).digest()
    up = moto.create_multipart_upload(
        Bucket=BUCKET, Key="sha256.bin", ChecksumAlgorithm="SHA256", ChecksumType="FULL_OBJECT"
    )
    parts = []
    for n, at in enumerate(range(0, len(sha), 5 * MIB), start=1):
        got = moto.upload_part(
            Bucket=BUCKET,
            Key="sha256.bin",
            UploadId=up["UploadId"],
            PartNumber=n,
            Body=sha[at : at + 5 * MIB],
            ChecksumAlgorithm="SHA256",
        )
        parts.append({"PartNumber": n, "ETag": got["ETag"]})
    import base64

    moto.complete_multipart_upload(
        Bucket=BUCKET,
        Key="sha256.bin",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": parts},
        ChecksumSHA256=base64.b64encode(digest).decode(),
        ChecksumType="FULL_OBJECT",
    )
    head = moto.head_object(Bucket=BUCKET, Key="sha256.bin", ChecksumMode="ENABLED")
    assert head["ETag"].endswith('-3"') and "ChecksumSHA256" in head
    weed_port = seaweedfs.ports["s3"]
    moto_port = int(moto_server.rsplit(":", 1)[1])
    return {
        "plain-md5": Obj("plain.bin", plain, weed_port, ADMIN_KEY),
        "multipart-sha256": Obj("sha256.bin", sha, moto_port, ("testing", "testing")),
        "multipart-crc64nvme": Obj("crc64.bin", crc, weed_port, ADMIN_KEY),
    }


@dataclass
class Rig:
    proxy: FaultProxy
    service: AssetService
    cache: Path

    def resolve(self, key: str, **kwargs: Any) -> Any:
        return self.service.resolve(f"s3://{BUCKET}/{key}", **kwargs)

    def blob(self, sha256: str) -> Path:
        return self.cache / "blobs" / "sha256" / sha256[:2] / sha256


def _rig(port: int, key_pair: tuple[str, str], cache: Path, **s3: Any) -> Rig:
    proxy = FaultProxy(port).start()
    cfg = load_config(env={"ASSETD_CACHE_DIR": str(cache)})
    s3_cfg = S3Config(
        endpoint_url=proxy.url,
        region="us-east-1",
        addressing_style="path",
        max_attempts=3,
        **s3,
    )
    cfg = replace(cfg, s3=s3_cfg, cache=replace(cfg.cache, negative_ttl_s=0))
    session = boto3.session.Session(
        aws_access_key_id=key_pair[0], aws_secret_access_key=key_pair[1]
    )
    service = AssetService(cfg, S3Fetcher(s3_cfg, session=session), Store(cache))
    return Rig(proxy, service, cache)


@pytest.fixture
def rig_for(tmp_path: Path) -> Iterator[Any]:
    made: list[Rig] = []

    def make(obj: Obj, **s3: Any) -> Rig:
        rig = _rig(obj.port, obj.key_pair, tmp_path / f"cache{len(made)}", **s3)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.proxy.stop()  # first: ends any trickle the fetcher may still be reading
        rig.service.close()


# --- corruption that keeps the length ----------------------------------------------

CASES = ["plain-md5", "multipart-sha256", "multipart-crc64nvme"]


@pytest.mark.parametrize("case", CASES)
def test_always_corrupted_body_is_integrity_and_never_cached(
    objects: dict[str, Obj], rig_for: Any, case: str
) -> None:
    """Every GET corrupted (same length): retryable `integrity`, and no blob of those bytes."""
    obj = objects[case]
    rig = rig_for(obj)
    rig.proxy.add(method="GET", corrupt=CORRUPT_AT)
    with pytest.raises(errors.AssetError) as caught:
        rig.resolve(obj.key)
    assert ("integrity", True) == (caught.value.code, caught.value.retryable)
    assert not rig.blob(obj.corrupted_sha256()).exists()
    rig.proxy.reset()
    clean = rig.resolve(obj.key)
    assert ("miss", obj.sha256) == (clean.cache, clean.sha256)
    assert obj.data == clean.path.read_bytes()


@pytest.mark.parametrize("case", CASES)
def test_once_corrupted_body_is_refetched_clean(
    objects: dict[str, Obj], rig_for: Any, case: str
) -> None:
    """The first GET corrupted, the retry clean: the caller gets exactly the stored bytes."""
    obj = objects[case]
    rig = rig_for(obj)
    rig.proxy.add(method="GET", corrupt=CORRUPT_AT, times=1)
    got = rig.resolve(obj.key)
    assert obj.sha256 == got.sha256
    assert obj.data == got.path.read_bytes()
    assert not rig.blob(obj.corrupted_sha256()).exists()
    assert rig.proxy.counts["GET"] >= 2


# --- misframed responses -----------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        {"length_delta": 7},  # announces more than it sends
        {"length_delta": -7},  # announces less than it sends
        {"extra_body": b"trailing garbage"},
        {"reset_after": 100_000},
        {"truncate": 5000},
        {"status": 500, "body": b"<html><body>502 Bad Gateway</body></html>"},
    ],
    ids=["cl-longer", "cl-shorter", "extra-body", "reset", "truncate", "500-html"],
)
def test_one_bad_response_is_retried_to_the_exact_bytes(
    objects: dict[str, Obj], rig_for: Any, rule: dict[str, Any]
) -> None:
    """One misframed GET response, then clean ones: the exact object, nothing else cached."""
    obj = objects["plain-md5"]
    rig = rig_for(obj)
    rig.proxy.add(method="GET", times=1, **rule)
    got = rig.resolve(obj.key)
    assert (obj.sha256, obj.data) == (got.sha256, got.path.read_bytes())
    blobs = [p.name for p in (rig.cache / "blobs" / "sha256").rglob("*") if p.is_file()]
    assert [obj.sha256] == blobs


@pytest.mark.parametrize(
    "rule",
    [
        {"length_delta": 7},
        {"length_delta": -7},
        {"extra_body": b"trailing garbage"},
        {"reset_after": 100_000},
        {"status": 500, "body": b"<html><body>oops</body></html>"},
    ],
    ids=["cl-longer", "cl-shorter", "extra-body", "reset", "500-html"],
)
def test_persistently_bad_responses_never_cache_other_bytes(
    objects: dict[str, Obj], rig_for: Any, rule: dict[str, Any]
) -> None:
    """Every GET misframed: the exact object (its size and MD5 check out) or a retryable code."""
    obj = objects["plain-md5"]
    rig = rig_for(obj)
    rig.proxy.add(method="GET", **rule)
    try:
        got = rig.resolve(obj.key)
    except errors.AssetError as exc:
        assert exc.code in ("unavailable", "integrity"), exc.code
        assert exc.retryable
        outcome = "error"
    else:
        assert (obj.sha256, obj.data) == (got.sha256, got.path.read_bytes())
        outcome = "exact"
    blobs = [p.name for p in (rig.cache / "blobs").rglob("*") if p.is_file()]
    assert ([] if outcome == "error" else [obj.sha256]) == blobs


@pytest.mark.parametrize("value", ["-5", "abc"])
def test_nonsense_content_length_is_unavailable(
    objects: dict[str, Obj], rig_for: Any, value: str
) -> None:
    """A GET with a negative or non-numeric Content-Length is a retryable `unavailable`."""
    obj = objects["plain-md5"]
    rig = rig_for(obj)
    rig.proxy.add(method="GET", header=("Content-Length", value))
    with pytest.raises(errors.AssetError) as caught:
        rig.resolve(obj.key)
    assert ("unavailable", True) == (caught.value.code, caught.value.retryable)


# --- slow responses end within the deadline ---------------------------------------


def _timed_resolve(rig: Rig, key: str, wait: float) -> tuple[Any, float]:
    """Resolve in a thread, waiting at most ``wait`` s; (result or exception, seconds)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(rig.resolve(key))
        except Exception as exc:  # the result under test
            out.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(wait)
    took = time.monotonic() - started
    return (out[0] if out else None), took


def _trickle_test(obj: Obj, rig: Rig, deadline: float, **rule: Any) -> None:
    rig.proxy.add(method="GET", trickle_max_s=10.0, **rule)
    result, took = _timed_resolve(rig, obj.key, wait=deadline + 4)
    assert isinstance(result, errors.Timeout), result
    assert took < deadline + 2, took
    # the client hung up: the proxy's trickle ended, long before its own bound
    ended = time.monotonic() + 4
    while not rig.proxy.trickle_ended and time.monotonic() < ended:
        time.sleep(0.05)
    assert rig.proxy.trickle_ended and max(rig.proxy.trickle_ended) < deadline + 3


@pytest.mark.parametrize("what", ["headers", "body"])
def test_trickle_ends_at_the_deadline(objects: dict[str, Obj], rig_for: Any, what: str) -> None:
    """Headers or body at 1 byte/s: `timeout` at s3.deadline_s, and the connection dropped."""
    obj = objects["plain-md5"]
    rig = rig_for(obj, read_timeout_s=30.0, deadline_s=2.0)
    _trickle_test(obj, rig, 2.0, **{f"trickle_{what}": 1.0})


# --- shutdown while a GET hangs ---------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="af", dir="/tmp") as tmp:
        yield socket_dir(Path(tmp))


def test_sigterm_during_a_hung_get_exits_within_the_grace_period(
    seaweedfs: SeaweedFS, objects: dict[str, Obj], short_tmp: Path
) -> None:
    """SIGTERM while a GET's headers trickle in: the daemon exits within grace + a margin."""
    grace = 2.0
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    proxy.add(method="GET", trickle_headers=1.0, trickle_max_s=12.0)
    sock = str(short_tmp / "d.sock")
    config = write_config(
        short_tmp / "d.toml",
        {
            "daemon": {"socket": sock},
            "cache": {"dir": str(short_tmp / "cache")},
            "s3": {
                "endpoint_url": proxy.url,
                "region": "us-east-1",
                "addressing_style": "path",
                "read_timeout_s": 5,
                "deadline_s": 60,
            },
            "log": {"format": "json"},
        },
    )
    env = {"AWS_ACCESS_KEY_ID": ADMIN_KEY[0], "AWS_SECRET_ACCESS_KEY": ADMIN_KEY[1]}
    d = DaemonProcess(config, sock, short_tmp / "d.log", env=env, grace=grace).start()
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(d.request({"op": "resolve", "source": f"s3://{BUCKET}/plain.bin"}))
        except (OSError, ValueError) as exc:  # a closed connection is a clean end too
            answers.append(repr(exc))

    asker = threading.Thread(target=ask, daemon=True)
    try:
        asker.start()
        until = time.monotonic() + 10
        while not proxy.counts["GET"] and time.monotonic() < until:
            time.sleep(0.05)
        assert proxy.counts["GET"], "the GET never started"
        time.sleep(0.5)
        started = time.monotonic()
        code = d.stop(timeout=30)
        took = time.monotonic() - started
    finally:
        d.kill()
        proxy.stop()
    asker.join(5)
    assert 0 == code
    assert took < grace + 3, took
