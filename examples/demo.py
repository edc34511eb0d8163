"""`make demo`: tp2 graded end to end, through SeaweedFS, assetd and bubblewrap.

1. Start SeaweedFS on 127.0.0.1 (free ports, credentials enforced) as the
   S3 engine, and upload tp2's RESTAURANTES.CSV (generated, fixed seed).
2. Start `assetd serve` with read-only credentials for that bucket.
3. Grade the reference and the wrong solution twice. The cache starts cold:
   the very first job's resolve downloads the dataset (a miss), every job
   after it is a hit. Each student program runs in bubblewrap with no
   network, no capabilities and an empty environment.
4. Show pre-flight refusing a missing object before any student code runs.
5. Print the daemon's stats, stop everything, exit 0.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> int:
    setup = grade.json.loads((TP2 / "setup.json").read_text())
    solutions = [TP2 / "solutions" / "reference.py", TP2 / "solutions" / "wrong.py"]
    with tempfile.TemporaryDirectory(prefix="assetd-demo-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        data = dataset.generate()
        admin.put_object(Bucket=BUCKET, Key=KEY, Body=data)
        print(f"S3 engine: SeaweedFS at {weed.endpoint_url}")
        print(f"uploaded s3://{BUCKET}/{KEY} ({len(data):,} bytes)")
        sock = work / "run" / "assetd.sock"
        config = work / "assetd.toml"
        config.write_text(
            f'[daemon]\nsocket = "{sock}"\n[cache]\ndir = "{work / "cache"}"\n'
            f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
            'allowed_prefixes = ["datasets/"]\nmax_object_bytes = "64MiB"\n'
            '[log]\nformat = "json"\n'
        )
        # the daemon holds the only credentials; the grader and the sandbox have none
        env = clean_env(AWS_ACCESS_KEY_ID=SCOPED_KEY[0], AWS_SECRET_ACCESS_KEY=SCOPED_KEY[1])
        log = (work / "assetd.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "assetd", "serve", "--config", str(config)],
            env=env,
            stderr=log,
        )
        try:
            _wait_for(sock, daemon)
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
