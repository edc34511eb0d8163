"""Cache lifecycle against the real daemon: crashes, overwrites, outages, tampering."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.seaweedfs import (
    SCOPED_BUCKET,
    SCOPED_KEY,
    SeaweedFS,
    clean_env,
    ensure_bucket,
)

pytestmark = pytest.mark.integration
BUCKET = SCOPED_BUCKET
CREDS = {"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]}


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="al", dir="/tmp") as tmp:
        yield socket_dir(Path(tmp))


Factory = Callable[..., DaemonProcess]


@pytest.fixture
def make_daemon(base: Path) -> Iterator[Factory]:
    started: list[DaemonProcess] = []

    def make(endpoint: str, *, cache: dict[str, Any] | None = None, **s3: Any) -> DaemonProcess:
        config = write_config(
            base / "assetd.toml",
            {
                "daemon": {"socket": str(base / "a.sock")},
                "cache": {"dir": str(base / "cache"), **(cache or {})},
                "s3": {
                    "endpoint_url": endpoint,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "allowed_buckets": [BUCKET],
                    **s3,
                },
                "log": {"format": "json"},
            },
        )
        proc = DaemonProcess(config, str(base / "a.sock"), base / "assetd.log", env=CREDS)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def _resolve(d: DaemonProcess, key: str, **extra: Any) -> dict[str, Any]:
    return d.request({"op": "resolve", "source": f"s3://{BUCKET}/{key}", **extra}, timeout=60)


def _blobs_hash_to_their_names(cache: Path) -> list[str]:
    """Names of blobs whose bytes do not hash to their name (should be none)."""
    bad = []
    for blob in (cache / "blobs" / "sha256").glob("*/*"):
        if hashlib.sha256(blob.read_bytes()).hexdigest() != blob.name:
            bad.append(blob.name)
    return bad


def _rows_point_at_valid_blobs(cache: Path) -> list[tuple[str, ...]]:
    """Index rows whose blob is missing or does not match (should be none)."""
    bad = []
    with diskcache.Cache(str(cache / "index")) as index:
        keys = list(index.iterkeys())
        for k in keys:
            if k[0] == "obj":
                sha = index.get(k)["sha256"]
                path = cache / "blobs" / "sha256" / sha[:2] / sha
                if (
                    ("blob", sha) not in index
                    or not path.exists()
                    or hashlib.sha256(path.read_bytes()).hexdigest() != sha
                ):
                    bad.append(k)
            elif k[0] == "cur" and ("obj", k[1], k[2], index.get(k)["tag"]) not in index:
                bad.append(k)
    return bad


def _wait_for_log(d: DaemonProcess, needle: str, timeout: float = 30) -> None:
    """Info lines are flushed in batches: poll the log for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in d.log():
            return
        time.sleep(0.1)
    raise AssertionError(f"daemon never logged {needle}")


def _wait_recovered(d: DaemonProcess) -> None:
    _wait_for_log(d, '"cache recovered"')


def test_kill_9_during_downloads_and_commits(
    seaweedfs: SeaweedFS, make_daemon: Factory, base: Path
) -> None:
    """kill -9 at 24 random moments mid-download and mid-commit; then all is consistent."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    rng = random.Random(20261126)  # noqa: S311 - reproducible kill moments, not secrets
    objects = {}
    for i, size in enumerate([64 << 10, 512 << 10, 1 << 20, 2 << 20, 3 << 20, 6 << 20]):
        data = os.urandom(size)
        objects[f"datasets/crash/{i}.bin"] = hashlib.sha256(data).hexdigest()
        admin.put_object(Bucket=BUCKET, Key=f"datasets/crash/{i}.bin", Body=data)
    # a small cache and no pins keep eviction churning, so most resolves are downloads
    d = make_daemon(
        seaweedfs.endpoint_url,
        cache={"max_bytes": "7MiB", "min_free_bytes": 0, "pin_seconds": 0},
    )
    kills = 0
    for _ in range(24):
        d.start()
        keys = list(objects)
        rng.shuffle(keys)

        def fire(key: str) -> None:
            with contextlib.suppress(OSError, ValueError):  # the daemon dies under it: the point
                _resolve(d, key)

        threads = [threading.Thread(target=fire, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.0, 0.25))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d.proc = None
        kills += 1
        for t in threads:
            t.join(30)
    cache = base / "cache"
    assert 24 == kills
    assert [] == _blobs_hash_to_their_names(cache)  # even before recovery
    d.start()
    _wait_recovered(d)
    d.stop()
    assert [] == _rows_point_at_valid_blobs(cache)
    assert [] == list((cache / "tmp").iterdir())
    d.start()
    answers = {key: _resolve(d, key) for key in objects}
    assert objects == {key: a.get("sha256") for key, a in answers.items()}


def test_overwrite_served_after_revalidate_window(
    seaweedfs: SeaweedFS, make_daemon: Factory
) -> None:
    """Within revalidate_after_s the old bytes are served; after it, the new ones."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    admin.put_object(Bucket=BUCKET, Key="datasets/moving.csv", Body=b"old,content\n")
    d = make_daemon(seaweedfs.endpoint_url, cache={"revalidate_after_s": 1.5})
    d.start()
    first = _resolve(d, "datasets/moving.csv")
    admin.put_object(Bucket=BUCKET, Key="datasets/moving.csv", Body=b"new,content,longer\n")
    within = _resolve(d, "datasets/moving.csv")
    time.sleep(1.6)
    after = _resolve(d, "datasets/moving.csv")
    again = _resolve(d, "datasets/moving.csv")
    assert (b"old,content\n", "hit") == (Path(within["path"]).read_bytes(), within["cache"])
    assert first["sha256"] == within["sha256"]
    assert (b"new,content,longer\n", "miss") == (Path(after["path"]).read_bytes(), after["cache"])
    assert "hit" == again["cache"]


def test_unchanged_object_revalidates_with_304(seaweedfs: SeaweedFS, make_daemon: Factory) -> None:
    """revalidate_after_s = 0: every resolve revalidates; an unchanged object stays a hit."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    admin.put_object(Bucket=BUCKET, Key="datasets/still.csv", Body=b"same\n")
    d = make_daemon(seaweedfs.endpoint_url, cache={"revalidate_after_s": 0})
    d.start()
    caches = [_resolve(d, "datasets/still.csv")["cache"] for _ in range(3)]
    stats = d.request({"op": "stats"})
    assert ["miss", "hit", "hit"] == caches
    assert {"head": 0, "get": 3} == stats["s3_requests"]  # 1 GET, then one 304 each


def test_s3_stopped_serves_stale_and_fails_uncached(make_daemon: Factory) -> None:
    """With S3 down: cached keys answer stale; uncached keys unavailable/timeout in time."""
    with SeaweedFS() as weed:
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        admin.put_object(Bucket=BUCKET, Key="datasets/a.csv", Body=b"a\n")
        admin.put_object(Bucket=BUCKET, Key="datasets/b.csv", Body=b"b\n")
        d = make_daemon(
            weed.endpoint_url,
            cache={"revalidate_after_s": 0},
            connect_timeout_s=1,
            read_timeout_s=2,
            max_attempts=3,
        )
        d.start()
        cached = _resolve(d, "datasets/a.csv")
    # SeaweedFS is stopped here
    stale = _resolve(d, "datasets/a.csv")
    started = time.monotonic()
    uncached = _resolve(d, "datasets/b.csv", timeout_s=4)
    took = time.monotonic() - started
    assert ("stale", cached["sha256"]) == (stale["cache"], stale["sha256"])
    assert uncached["error"]["code"] in ("unavailable", "timeout")
    assert took < 4 + 1.0
    _wait_for_log(d, '"serving stale copy"')


def test_tampered_and_deleted_blobs_are_fetched_again(
    seaweedfs: SeaweedFS, make_daemon: Factory, base: Path
) -> None:
    """A modified blob is quarantined and refetched; a deleted one too; bad bytes never served."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    data = os.urandom(200_000)
    admin.put_object(Bucket=BUCKET, Key="datasets/tamper.bin", Body=data)
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    path = Path(_resolve(d, "datasets/tamper.bin")["path"])
    os.chmod(path, 0o644)
    with path.open("r+b") as f:
        f.write(b"EVIL")
    tampered = _resolve(d, "datasets/tamper.bin")
    assert (data, "miss") == (Path(tampered["path"]).read_bytes(), tampered["cache"])
    quarantined = list((base / "cache" / "quarantine").iterdir())
    assert 1 == len(quarantined)
    assert quarantined[0].read_bytes().startswith(b"EVIL")
    path.unlink()
    deleted = _resolve(d, "datasets/tamper.bin")
    assert (data, "miss") == (Path(deleted["path"]).read_bytes(), deleted["cache"])


def test_watchdog_notices_deleted_blob_and_config_change(
    seaweedfs: SeaweedFS, make_daemon: Factory
) -> None:
    """watchdog: a deleted blob is logged as it happens; a config edit reloads like SIGHUP."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    admin.put_object(Bucket=BUCKET, Key="datasets/w.csv", Body=b"w\n")
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    _wait_recovered(d)
    Path(_resolve(d, "datasets/w.csv")["path"]).unlink()
    _wait_for_log(d, '"blob deleted under the cache"', timeout=10)  # before any resolve sees it
    d.config.write_text(d.config.read_text().replace(f'["{BUCKET}"]', '["elsewhere"]'))
    deadline = time.monotonic() + 10
    code = None
    while time.monotonic() < deadline and code != "not_allowed":
        answer = _resolve(d, "datasets/w.csv")
        code = None if answer["ok"] else answer["error"]["code"]
        time.sleep(0.1)
    assert "not_allowed" == code
    _wait_for_log(d, '"reloaded"')


def test_verify_cli_quarantines_corrupt_blob(
    seaweedfs: SeaweedFS, make_daemon: Factory, base: Path
) -> None:
    """`assetd verify` (a real subprocess) exits 1 and quarantines a corrupted blob."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    admin.put_object(Bucket=BUCKET, Key="datasets/v.csv", Body=b"v" * 1000)
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    path = Path(_resolve(d, "datasets/v.csv")["path"])
    d.stop()

    def verify() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "assetd", "verify", "--config", str(d.config), "--json"]
        return subprocess.run(
            argv, capture_output=True, text=True, env=clean_env(), timeout=60, check=False
        )

    clean = verify()
    os.chmod(path, 0o644)
    path.write_bytes(b"x" * 1000)
    dirty = verify()
    assert (0, []) == (clean.returncode, json.loads(clean.stdout)["mismatched"])
    assert (1, [path.name]) == (dirty.returncode, json.loads(dirty.stdout)["mismatched"])
    assert not path.exists()
