"""`make demo`: SeaweedFS, a sample dataset, `assetd check`, then the daemon.

Starts SeaweedFS on 127.0.0.1 (free ports, credentials enforced), uploads a
generated RESTAURANTES.CSV to s3://autograder-assets/datasets/tp2/, runs
`assetd check`, starts `assetd serve`, asks it for the dataset twice (a
miss, then a hit), shows a policy refusal, a prefetch and the stats, and
stops everything it started.
"""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.seaweedfs import READER_KEY, SeaweedFS, clean_env

BUCKET = "autograder-assets"
KEY = "datasets/tp2/RESTAURANTES.CSV"


def dataset(rows: int = 20_000, seed: int = 2) -> bytes:
    rng = random.Random(seed)  # noqa: S311 - a reproducible dataset, not a secret
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["id", "nombre", "barrio", "tipo", "precio_medio", "puntuacion"])
    kinds = ["parrilla", "pizzeria", "cafe", "bodegon", "sushi", "vegano"]
    areas = ["Palermo", "Recoleta", "San Telmo", "Belgrano", "Caballito", "Almagro"]
    for i in range(1, rows + 1):
        w.writerow(
            [
                i,
                f"Restaurante {i}",
                rng.choice(areas),
                rng.choice(kinds),
                rng.randint(800, 9000),
                round(rng.uniform(1, 5), 1),
            ]
        )
    return out.getvalue().encode()


def _run(argv: list[str], env: dict[str, str], expect: int = 0) -> None:
    print("\n$ assetd " + " ".join(argv[3:]))
    proc = subprocess.run(argv, env=env, check=False, timeout=120)
    if proc.returncode != expect:
        raise SystemExit(f"demo: exit {proc.returncode}, expected {expect}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="assetd-demo-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        print(f"SeaweedFS S3 on {weed.endpoint_url}")
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        data = dataset()
        admin.put_object(Bucket=BUCKET, Key=KEY, Body=data)
        print(f"uploaded s3://{BUCKET}/{KEY} ({len(data)} bytes)")
        sock = work / "run" / "assetd.sock"
        config = work / "assetd.toml"
        config.write_text(
            f'[daemon]\nsocket = "{sock}"\n[cache]\ndir = "{work / "cache"}"\n'
            f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
            'allowed_prefixes = ["datasets/"]\nmax_object_bytes = "64MiB"\n'
            '[log]\nformat = "console"\n'
        )
        env = clean_env(AWS_ACCESS_KEY_ID=READER_KEY[0], AWS_SECRET_ACCESS_KEY=READER_KEY[1])
        assetd = [sys.executable, "-m", "assetd"]
        source = f"s3://{BUCKET}/{KEY}"
        # check is in-process and writes its own cache, so the daemon below starts cold
        check_env = {**env, "ASSETD_CACHE_DIR": str(work / "check-cache")}
        _run([*assetd, "check", source, "--config", str(config)], check_env)
        daemon = subprocess.Popen([*assetd, "serve", "--config", str(config)], env=env)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("demo: the daemon did not start")
                time.sleep(0.05)
            for label in ("cold: a miss", "warm: a hit"):
                print(f"\n# {label}")
                _run([*assetd, "get", source, "--json", "--socket", str(sock)], env)
            _run([*assetd, "get", "s3://other-bucket/x.csv", "--socket", str(sock)], env, 1)
            _run([*assetd, "prefetch", source, "--socket", str(sock)], env)
            _run([*assetd, "stats", "--socket", str(sock)], env)
        finally:
            daemon.terminate()
            daemon.wait(30)
    print("\ndemo finished: daemon and SeaweedFS stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
