"""`make demo`: tp2 graded end to end, through SeaweedFS, assetd and bubblewrap.

1. Start SeaweedFS on 127.0.0.1 (free ports, credentials enforced) as the
   S3 engine, and upload tp2's RESTAURANTES.CSV (generated, fixed seed).
2. Start `assetd serve` with read-only credentials for that bucket.
3. Grade the reference and the wrong solution twice. The cache starts cold:
   the very first job's resolve downloads the dataset (a miss), every job
   after it is a hit. Each student program runs in bubblewrap with no
   network, no capabilities and an empty environment.
4. Show pre-flight refusing a missing object before any student code runs.
5. Reproducible grading: the teacher publishes the assignment with
   `assetd lock` (version_id and sha256 written into setup.json), then
   overwrites the dataset in SeaweedFS. `assetd lock --check` reports the
   drift; the locked re-grade still gets (and passes with) the pinned bytes,
   while the same re-grade unpinned gets the new ones. Then the cache is
   evicted (`assetd gc`) and the locked re-grade fetches the old version by
   its version_id; then SeaweedFS is stopped and the locked re-grade is
   served from the cache. Each job's manifest names the bytes it got.
6. Print the daemon's stats, stop everything, exit 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "tp2"))

import dataset  # noqa: E402
import grade  # noqa: E402

from assetd import AssetdClient  # noqa: E402
from assetd.grader import AssetSourceResolver  # noqa: E402
from tests.support.seaweedfs import SCOPED_KEY, SeaweedFS, clean_env  # noqa: E402

BUCKET = "autograder-assets"
KEY = "datasets/tp2/RESTAURANTES.CSV"
TP2 = ROOT / "examples" / "tp2"


def _wait_for(sock: Path, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not sock.exists():
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise SystemExit("demo: the daemon did not start")
        time.sleep(0.05)


def _start(config: Path, sock: Path, env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "assetd", "serve", "--config", str(config)], env=env, stderr=log
    )
    _wait_for(sock, daemon)
    return daemon


def _assetd(*args: str) -> subprocess.CompletedProcess[str]:
    """An `assetd` command, as a teacher or operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "assetd", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
        check=False,
    )


def _dataset(verdict: grade.Verdict) -> str:
    """What the job's manifest says about the dataset: digest, version, cache status."""
    assert verdict.manifest is not None
    a = verdict.manifest["assets"][0]
    return f"sha256 {a['sha256'][:12]}  version_id {a['version_id']}  cache {a['cache']}"


def _reproducible(
    work: Path,
    weed: SeaweedFS,
    sock: Path,
    restart: Callable[..., subprocess.Popen[bytes]],
    solution: Path,
) -> subprocess.Popen[bytes]:
    """Lock, overwrite, re-grade pinned and unpinned, evict, re-grade, stop S3, re-grade."""
    admin = weed.client()
    setup_path = work / "setup.json"
    setup_path.write_text((TP2 / "setup.json").read_text())
    unpinned = json.loads(setup_path.read_text())
    print("\n-- the teacher publishes tp2: assetd lock setup.json")
    locked = _assetd("lock", str(setup_path), "--socket", str(sock))
    print("  " + "\n  ".join(locked.stdout.strip().splitlines()))
    entry = json.loads(setup_path.read_text())["assets"][0]
    print(f"  setup.json entry now: {json.dumps(entry)}")
    original = dataset.generate()
    changed = dataset.generate(seed=3)
    admin.put_object(Bucket=BUCKET, Key=KEY, Body=changed)
    print(f"-- the dataset is overwritten in SeaweedFS ({len(changed):,} new bytes)")
    check = _assetd("lock", "--check", str(setup_path), "--socket", str(sock))
    print(f"  assetd lock --check: exit {check.returncode}")
    print("  " + "\n  ".join(check.stdout.strip().splitlines()))
    pinned = json.loads(setup_path.read_text())
    key_before = grade.expected_output(original)
    with AssetdClient(str(sock)) as client:
        resolver = AssetSourceResolver(client=client)
        print("-- re-grade, locked setup.json")
        v = grade.grade(solution, pinned, resolver)
        print(f"  {v.line()}\n    dataset: {_dataset(v)}")
        print("-- re-grade, the same setup unpinned")
        u = grade.grade(solution, unpinned, resolver)
        print(f"  {u.line()}\n    dataset: {_dataset(u)}")
    assert v.manifest and u.manifest
    assert v.manifest["assets"][0]["sha256"] == entry["sha256"]
    assert u.manifest["assets"][0]["sha256"] != entry["sha256"]
    print("-- the host's cache is evicted (assetd gc with a 1-byte limit, daemon stopped)")
    daemon = restart(evict=True)
    with AssetdClient(str(sock)) as client:
        resolver = AssetSourceResolver(client=client)
        e = grade.grade(solution, pinned, resolver)
        print(f"  {e.line()}\n    dataset: {_dataset(e)}  (fetched again by version_id)")
        weed.stop()
        print("-- SeaweedFS is stopped: re-grade, locked setup.json")
        d = grade.grade(solution, pinned, resolver)
        print(f"  {d.line()}\n    dataset: {_dataset(d)}  (no S3 request)")
        bytes_now = grade.preflight(resolver, pinned, job="key")[0].path.read_bytes()
    same = {r.manifest["assets"][0]["sha256"] for r in (v, e, d) if r.manifest}
    assert same == {entry["sha256"]} and {v.status, e.status, d.status} == {"pass"}
    unchanged = grade.expected_output(bytes_now) == key_before
    print(
        f"  every locked re-grade got the same bytes ({entry['sha256'][:12]}); the teacher's "
        f"key computed from them is {'the one published' if unchanged else 'DIFFERENT'}"
    )
    return daemon


def main() -> int:
    setup = grade.json.loads((TP2 / "setup.json").read_text())
    solutions = [TP2 / "solutions" / "reference.py", TP2 / "solutions" / "wrong.py"]
    with tempfile.TemporaryDirectory(prefix="assetd-demo-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        # versioned: a locked assignment stays fetchable by version_id after an overwrite
        admin.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        data = dataset.generate()
        admin.put_object(Bucket=BUCKET, Key=KEY, Body=data)
        print(f"S3 engine: SeaweedFS at {weed.endpoint_url}")
        print(f"uploaded s3://{BUCKET}/{KEY} ({len(data):,} bytes)")
        sock = work / "run" / "assetd.sock"
        config = work / "assetd.toml"
        config.write_text(
            f'[daemon]\nsocket = "{sock}"\n[cache]\ndir = "{work / "cache"}"\n'
            # pin_seconds = 0 lets step 5 evict; revalidate_after_s = 0 sees the overwrite at once
            "pin_seconds = 0\nrevalidate_after_s = 0\n"
            f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
            'allowed_prefixes = ["datasets/"]\nmax_object_bytes = "64MiB"\n'
            "connect_timeout_s = 1\nread_timeout_s = 2\nmax_attempts = 2\n"
            '[log]\nformat = "json"\n'
        )
        # the daemon holds the only credentials; the grader and the sandbox have none
        env = clean_env(AWS_ACCESS_KEY_ID=SCOPED_KEY[0], AWS_SECRET_ACCESS_KEY=SCOPED_KEY[1])
        log = (work / "assetd.log").open("wb")
        daemon = _start(config, sock, env, log)

        def restart(evict: bool) -> subprocess.Popen[bytes]:
            nonlocal daemon
            daemon.terminate()
            daemon.wait(30)
            if evict:
                gc = work / "gc.toml"
                gc.write_text(f'[cache]\ndir = "{work / "cache"}"\nmax_bytes = 1\n')
                report = json.loads(_assetd("gc", "--config", str(gc), "--json").stdout)
                print(f"  evicted {report['eviction']['removed_blobs']} blobs")
            daemon = _start(config, sock, env, log)
            return daemon

        try:
            print(f"assetd serving on {sock}\n")
            with AssetdClient(str(sock)) as client:
                resolver = AssetSourceResolver(client=client)
                for round_ in ("first round (cold cache)", "second round (warm cache)"):
                    print(f"-- {round_}")
                    for solution in solutions:
                        print("  " + grade.grade(solution, setup, resolver).line())
                missing = {
                    "assets": [
                        {
                            "source": f"s3://{BUCKET}/datasets/tp2/MISSING.CSV",
                            "target": "/tmp/M.CSV",
                        }
                    ]
                }
                print("-- a setup config naming a missing object")
                print("  " + grade.grade(solutions[0], missing, resolver).line())
            daemon = _reproducible(work, weed, sock, restart, solutions[0])
            with AssetdClient(str(sock)) as client:
                stats = client.stats()
            print(
                f"\nassetd stats: {stats['entries']} entries, {stats['bytes']:,} bytes, "
                f"{stats['hits']} hits, {stats['misses']} misses, "
                f"S3 HEAD/GET {stats['s3_requests']['head']}/{stats['s3_requests']['get']}, "
                f"errors {stats['errors']}"
            )
        finally:
            daemon.terminate()
            daemon.wait(30)
            log.close()
    print("demo finished: assetd and SeaweedFS stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
