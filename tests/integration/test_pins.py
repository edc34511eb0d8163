"""Content pins, the asset:// catalog, lock files and manifests: SeaweedFS and the real daemon."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import AssetdClient
from assetd.grader import AssetSourceResolver, PreflightError, parse_assets
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.seaweedfs import READER_KEY, SeaweedFS, clean_env, ensure_bucket

pytestmark = pytest.mark.integration
PLAIN = "pins-plain"
VERSIONED = "pins-versioned"
CREDS = {"AWS_ACCESS_KEY_ID": READER_KEY[0], "AWS_SECRET_ACCESS_KEY": READER_KEY[1]}
OLD = b"barrio,puntuacion\nPalermo,4.5\n"
NEW = b"barrio,puntuacion\nPalermo,4.5\nBelgrano,3.9\n"
Factory = Callable[..., DaemonProcess]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def base() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ap", dir="/tmp") as tmp:
        yield socket_dir(Path(tmp))


@pytest.fixture(scope="module")
def buckets(seaweedfs: SeaweedFS) -> Any:
    admin = seaweedfs.client()
    ensure_bucket(admin, PLAIN)
    ensure_bucket(admin, VERSIONED)
    admin.put_bucket_versioning(Bucket=VERSIONED, VersioningConfiguration={"Status": "Enabled"})
    return admin


@pytest.fixture
def make_daemon(base: Path) -> Iterator[Factory]:
    started: list[DaemonProcess] = []

    def make(
        endpoint: str,
        *,
        cache: dict[str, Any] | None = None,
        catalog: Path | None = None,
        **s3: Any,
    ) -> DaemonProcess:
        sections: dict[str, dict[str, Any]] = {
            "daemon": {"socket": str(base / "a.sock")},
            "cache": {"dir": str(base / "cache"), "revalidate_after_s": 0, **(cache or {})},
            "s3": {
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "addressing_style": "path",
                "allowed_buckets": [PLAIN, VERSIONED],
                **s3,
            },
            "log": {"format": "json"},
        }
        if catalog is not None:
            sections["catalog"] = {"file": str(catalog)}
        config = write_config(base / "assetd.toml", sections)
        proc = DaemonProcess(config, str(base / "a.sock"), base / "assetd.log", env=CREDS)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def _resolve(d: DaemonProcess, source: str, **extra: Any) -> dict[str, Any]:
    return d.request({"op": "resolve", "source": source, **extra}, timeout=60)


def _s3_requests(d: DaemonProcess) -> dict[str, int]:
    return dict(d.request({"op": "stats"})["s3_requests"])


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"never happened: {what}")


# --- pins ----------------------------------------------------------------------------------


def test_pin_served_after_overwrite_and_while_s3_stopped(make_daemon: Factory) -> None:
    """Pinned old content: a hit after an overwrite, no S3 request; still a hit with S3 stopped."""
    key = "datasets/tp2/R.CSV"
    src = f"s3://{PLAIN}/{key}"
    with SeaweedFS() as weed:
        admin = weed.client()
        admin.create_bucket(Bucket=PLAIN)
        admin.put_object(Bucket=PLAIN, Key=key, Body=OLD)
        d = make_daemon(
            weed.endpoint_url,
            cache={"serve_stale_on_error": False},
            connect_timeout_s=1,
            read_timeout_s=2,
            max_attempts=2,
        )
        d.start()
        first = _resolve(d, src)
        admin.put_object(Bucket=PLAIN, Key=key, Body=NEW)
        refetched = _resolve(d, src)
        before = _s3_requests(d)
        pinned = _resolve(d, src, sha256=sha(OLD))
        after = _s3_requests(d)
    # SeaweedFS is stopped here
    down_old = _resolve(d, src, sha256=sha(OLD))
    down_new = _resolve(d, src, sha256=sha(NEW))
    unpinned = _resolve(d, src, timeout_s=4)
    assert (sha(OLD), sha(NEW)) == (first["sha256"], refetched["sha256"])
    assert ("hit", OLD) == (pinned["cache"], Path(pinned["path"]).read_bytes())
    assert before == after
    assert ("hit", OLD) == (down_old["cache"], Path(down_old["path"]).read_bytes())
    assert ("hit", NEW) == (down_new["cache"], Path(down_new["path"]).read_bytes())
    assert unpinned["error"]["code"] in ("unavailable", "timeout")  # serve_stale_on_error off


def test_wrong_pin_is_content_mismatch_and_nothing_is_placed(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory, tmp_path: Path
) -> None:
    """A pin the object does not match: content_mismatch, no path, pre-flight stops the job."""
    key = "datasets/mismatch.csv"
    buckets.put_object(Bucket=PLAIN, Key=key, Body=NEW)
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    answer = _resolve(d, f"s3://{PLAIN}/{key}", sha256=sha(OLD))
    expected = (
        f"the object's content (sha256 {sha(NEW)[:12]}...) is not the pinned content "
        f"(sha256 {sha(OLD)[:12]}...)"
    )
    assert {"code": "content_mismatch", "message": expected, "retryable": False} == answer["error"]
    assert "path" not in answer
    setup = {
        "assets": [{"source": f"s3://{PLAIN}/{key}", "target": "/tmp/x.csv", "sha256": sha(OLD)}]
    }
    with AssetdClient(d.socket_path) as client, pytest.raises(PreflightError) as info:
        AssetSourceResolver(client=client).resolve_assets(parse_assets(setup))
    assert ["content_mismatch"] == info.value.codes
    assert [None] == [a.sha256 for a in info.value.manifest.assets]  # no bytes named, none placed


def test_pin_for_blob_only_another_key_has_is_fetched(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory
) -> None:
    """Bytes cached for another key are not served for this key's pin: this key is fetched."""
    buckets.put_object(Bucket=PLAIN, Key="datasets/other.csv", Body=OLD)
    buckets.put_object(Bucket=PLAIN, Key="datasets/same.csv", Body=OLD)
    buckets.put_object(Bucket=PLAIN, Key="datasets/diff.csv", Body=NEW)
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    other = _resolve(d, f"s3://{PLAIN}/datasets/other.csv")
    gets = _s3_requests(d)["get"]
    same = _resolve(d, f"s3://{PLAIN}/datasets/same.csv", sha256=sha(OLD))
    diff = _resolve(d, f"s3://{PLAIN}/datasets/diff.csv", sha256=sha(OLD))
    assert ("miss", other["path"]) == (same["cache"], same["path"])  # fetched; stored once
    assert gets + 2 == _s3_requests(d)["get"]
    assert "content_mismatch" == diff["error"]["code"]


# --- the asset:// catalog -------------------------------------------------------------------


def _catalog(path: Path, entries: dict[str, dict[str, str]]) -> Path:
    lines = []
    for name, fields in entries.items():
        lines.append(f"[assets.{json.dumps(name)}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_catalog_aliases_policy_unknown_and_reloads(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory, base: Path
) -> None:
    """Aliases resolve through policy; unknown names, SIGHUP, a saved file, an invalid reload."""
    buckets.put_object(Bucket=PLAIN, Key="datasets/cat.csv", Body=OLD)
    buckets.put_object(Bucket=VERSIONED, Key="datasets/cat.csv", Body=NEW)
    src = f"s3://{PLAIN}/datasets/cat.csv"
    catalog = _catalog(
        base / "catalog.toml",
        {"tp2/data": {"source": src}, "outside": {"source": f"s3://{VERSIONED}/datasets/cat.csv"}},
    )
    d = make_daemon(seaweedfs.endpoint_url, catalog=catalog, allowed_buckets=[PLAIN])
    d.start()
    alias = _resolve(d, "asset://tp2/data")
    outside = _resolve(d, "asset://outside")
    unknown = _resolve(d, "asset://tp2/later")
    assert ("asset://tp2/data", src, sha(OLD)) == (
        alias["source"],
        alias["resolved_source"],
        alias["sha256"],
    )
    assert "not_allowed" == outside["error"]["code"]
    assert "not_found" == unknown["error"]["code"]
    assert {"tp2/data": {"resolved_source": src, "resolves": 1}} == d.request({"op": "stats"})[
        "aliases"
    ]
    _wait_for(lambda: f'"resolved_source": "{src}"' in d.log(), "resolved_source in the log")

    # a saved catalog is reloaded; the earlier not_found was not cached
    _catalog(catalog, {"tp2/data": {"source": src}, "tp2/later": {"source": src}})
    _wait_for(lambda: _resolve(d, "asset://tp2/later")["ok"], "saved catalog reloaded")

    # an invalid catalog is refused at reload, the running one kept
    catalog.write_text('[assets."tp2/data"]\nsource = "s3://pins-plain/x"\nsha256 = "nope"\n')
    d.signal(signal.SIGHUP)
    _wait_for(lambda: "catalog reload failed" in d.log(), "invalid reload logged")
    assert src == _resolve(d, "asset://tp2/later")["resolved_source"]

    # SIGHUP with a valid file: the new entry set is live
    _catalog(catalog, {"renamed": {"source": src}})
    d.signal(signal.SIGHUP)
    _wait_for(lambda: _resolve(d, "asset://renamed")["ok"], "SIGHUP reload")
    assert "not_found" == _resolve(d, "asset://tp2/data")["error"]["code"]


def test_invalid_catalog_fails_start_with_one_line(
    seaweedfs: SeaweedFS, make_daemon: Factory, base: Path
) -> None:
    """An invalid catalog stops start-up: exit 2, one line naming the file and the entry."""
    catalog = base / "catalog.toml"
    catalog.write_text('[assets."tp2/data"]\nsource = "https://example.org/x.csv"\n')
    d = make_daemon(seaweedfs.endpoint_url, catalog=catalog)
    proc = subprocess.run(
        [sys.executable, "-m", "assetd", "serve", "--config", str(d.config)],
        capture_output=True,
        text=True,
        env=clean_env(**CREDS),
        timeout=60,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert 2 == proc.returncode
    assert [
        f'assetd: cannot start: {catalog}: assets."tp2/data": source: '
        "unsupported source scheme 'https'"
    ] == lines


# --- lock files ---------------------------------------------------------------------------------


def _lock(d: DaemonProcess, setup: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "assetd", "lock", str(setup), "--socket", d.socket_path, *args]
    return subprocess.run(
        argv, capture_output=True, text=True, env=clean_env(), timeout=120, check=False
    )


def _setup(path: Path, source: str) -> Path:
    path.write_text(
        "{\n"
        '  "assets": [\n'
        "    {\n"
        f'      "source": "{source}",\n'
        '      "target": "/tmp/RESTAURANTES.CSV",\n'
        '      "read_only": true\n'
        "    }\n"
        "  ],\n"
        '  "run": "python3 /work/solution.py"\n'
        "}\n"
    )
    return path


def _regrade(d: DaemonProcess, setup: Path) -> tuple[bytes, dict[str, Any]]:
    with AssetdClient(d.socket_path) as client:
        assets = AssetSourceResolver(client=client).resolve_assets(
            parse_assets(json.loads(setup.read_text()))
        )
    return assets[0].path.read_bytes(), assets.manifest.assets[0].to_dict()


def test_lock_round_trip_unversioned(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory, base: Path
) -> None:
    """lock writes sha256 in place (format kept); --check passes, then lists the overwrite."""
    key = "datasets/lock-plain.csv"
    buckets.put_object(Bucket=PLAIN, Key=key, Body=OLD)
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    setup = _setup(base / "setup.json", f"s3://{PLAIN}/{key}")
    original = setup.read_text()
    locked = _lock(d, setup)
    text = setup.read_text()
    clean = _lock(d, setup, "--check")
    buckets.put_object(Bucket=PLAIN, Key=key, Body=NEW)
    drift = _lock(d, setup, "--check", "--json")
    content, manifest = _regrade(d, setup)
    assert 0 == locked.returncode, locked.stderr
    assert (
        original.replace(
            f'"s3://{PLAIN}/{key}",\n', f'"s3://{PLAIN}/{key}",\n      "sha256": "{sha(OLD)}",\n'
        )
        == text
    )
    assert 0 == clean.returncode
    assert 1 == drift.returncode
    report = json.loads(drift.stdout)
    assert [("drifted", sha(OLD), sha(NEW))] == [
        (e["status"], e["locked"]["sha256"], e["current"]["sha256"]) for e in report["entries"]
    ]
    assert text == setup.read_text()  # --check writes nothing
    assert (OLD, "hit", sha(OLD)) == (content, manifest["cache"], manifest["sha256"])


def test_lock_round_trip_versioned_regrades_after_eviction(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory, base: Path
) -> None:
    """Versioned: lock writes version_id and sha256; after overwrite and eviction, same bytes."""
    key = "datasets/lock-versioned.csv"
    first = buckets.put_object(Bucket=VERSIONED, Key=key, Body=OLD)
    d = make_daemon(seaweedfs.endpoint_url, cache={"pin_seconds": 0})
    d.start()
    setup = _setup(base / "setup.json", f"s3://{VERSIONED}/{key}")
    locked = _lock(d, setup)
    entry = json.loads(setup.read_text())["assets"][0]
    clean = _lock(d, setup, "--check")
    buckets.put_object(Bucket=VERSIONED, Key=key, Body=NEW)
    drift = _lock(d, setup, "--check")
    d.stop()
    gc_config = write_config(
        base / "gc.toml", {"cache": {"dir": str(base / "cache"), "max_bytes": 1}}
    )
    gc = subprocess.run(
        [sys.executable, "-m", "assetd", "gc", "--config", str(gc_config), "--json"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    d.start()
    content, manifest = _regrade(d, setup)
    assert (0, 0, 1) == (locked.returncode, clean.returncode, drift.returncode)
    assert ["source", "version_id", "sha256", "target", "read_only"] == list(entry)
    assert (first["VersionId"], sha(OLD)) == (entry["version_id"], entry["sha256"])
    assert "drifted" in drift.stdout
    assert 0 < json.loads(gc.stdout)["eviction"]["removed_blobs"]
    assert (OLD, "miss", first["VersionId"]) == (content, manifest["cache"], manifest["version_id"])


# --- manifests ------------------------------------------------------------------------------------


def test_manifest_for_miss_hit_and_stale(make_daemon: Factory) -> None:
    """The grader's manifest names the bytes and how they came: miss, then hit, then stale."""
    key = "datasets/tp2/M.CSV"
    src = f"s3://{PLAIN}/{key}"
    setup = {"assets": [{"source": src, "target": "/tmp/M.CSV"}]}
    with SeaweedFS() as weed:
        admin = weed.client()
        admin.create_bucket(Bucket=PLAIN)
        etag = admin.put_object(Bucket=PLAIN, Key=key, Body=OLD)["ETag"]
        d = make_daemon(weed.endpoint_url, connect_timeout_s=1, read_timeout_s=2, max_attempts=2)
        d.start()
        client = AssetdClient(d.socket_path)
        resolver = AssetSourceResolver(client=client)
        miss = resolver.resolve_assets(parse_assets(setup), job="j1").manifest
        hit = resolver.resolve_assets(parse_assets(setup), job="j2").manifest
    stale = resolver.resolve_assets(parse_assets(setup), job="j3").manifest
    client.close()

    def expected(cache: str, job: str) -> dict[str, Any]:
        return {
            "manifest_version": 1,
            "job": job,
            "assets": [
                {
                    "target": "/tmp/M.CSV",
                    "source": src,
                    "resolved_source": src,
                    "version_id": None,
                    "etag": etag,
                    "sha256": sha(OLD),
                    "size": len(OLD),
                    "cache": cache,
                    "error": None,
                }
            ],
        }

    assert expected("miss", "j1") == json.loads(miss.to_json())
    assert expected("hit", "j2") == json.loads(hit.to_json())
    assert expected("stale", "j3") == json.loads(stale.to_json())


def test_prefetch_entries_carry_their_own_pins(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory
) -> None:
    """A prefetch entry's sha256 applies to it alone; a malformed one fails only that entry."""
    buckets.put_object(Bucket=PLAIN, Key="datasets/pf.csv", Body=OLD)
    src = f"s3://{PLAIN}/datasets/pf.csv"
    d = make_daemon(seaweedfs.endpoint_url)
    d.start()
    answer = d.request(
        {
            "op": "prefetch",
            "sources": [
                {"source": src, "sha256": sha(OLD)},
                {"source": src, "sha256": sha(NEW)},
                {"source": src, "sha256": "NOT-HEX"},
                src,
            ],
        },
        timeout=60,
    )
    results = answer["results"]
    assert [True, "content_mismatch", "bad_request", True] == [
        r["ok"] if r["ok"] else r["error"]["code"] for r in results
    ]


def test_asset_alias_end_to_end_through_the_grader(
    seaweedfs: SeaweedFS, buckets: Any, make_daemon: Factory, base: Path
) -> None:
    """A setup config naming asset:// (pinned) resolves through assetd.grader; its manifest too."""
    buckets.put_object(Bucket=PLAIN, Key="datasets/e2e.csv", Body=OLD)
    src = f"s3://{PLAIN}/datasets/e2e.csv"
    catalog = _catalog(base / "catalog.toml", {"tp2/e2e": {"source": src}})
    d = make_daemon(seaweedfs.endpoint_url, catalog=catalog)
    d.start()
    setup = {"assets": [{"source": "asset://tp2/e2e", "target": "/tmp/E.CSV", "sha256": sha(OLD)}]}
    with AssetdClient(d.socket_path) as client:
        assets = AssetSourceResolver(client=client).resolve_assets(parse_assets(setup), job="e2e")
    entry = assets.manifest.assets[0]
    assert OLD == assets[0].path.read_bytes()
    assert ("asset://tp2/e2e", src, sha(OLD), "miss") == (
        entry.source,
        entry.resolved_source,
        entry.sha256,
        entry.cache,
    )
