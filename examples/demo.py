"""`make demo`: a local SeaweedFS, a sample dataset, and `assetd check` against it.

Starts SeaweedFS on 127.0.0.1 (free ports, credentials enforced), uploads a
generated RESTAURANTES.CSV to s3://autograder-assets/datasets/tp2/, then
runs `assetd check` twice as a real subprocess: a cold miss, then a hit.
Stops everything it started.
"""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
import tempfile
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


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="assetd-demo-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        print(f"SeaweedFS S3 on {weed.endpoint_url}")
        admin = weed.client()
        admin.create_bucket(Bucket=BUCKET)
        data = dataset()
        admin.put_object(Bucket=BUCKET, Key=KEY, Body=data)
        print(f"uploaded s3://{BUCKET}/{KEY} ({len(data)} bytes)")
        config = work / "assetd.toml"
        config.write_text(
            f'[cache]\ndir = "{work / "cache"}"\n'
            f'[s3]\nendpoint_url = "{weed.endpoint_url}"\nregion = "us-east-1"\n'
            f'addressing_style = "path"\nallowed_buckets = ["{BUCKET}"]\n'
            'allowed_prefixes = ["datasets/"]\nmax_object_bytes = "64MiB"\n'
        )
        env = clean_env(AWS_ACCESS_KEY_ID=READER_KEY[0], AWS_SECRET_ACCESS_KEY=READER_KEY[1])
        argv = [
            sys.executable,
            "-m",
            "assetd",
            "check",
            f"s3://{BUCKET}/{KEY}",
            "--config",
            str(config),
        ]
        for attempt in ("cold", "warm"):
            print(f"\n$ assetd check s3://{BUCKET}/{KEY}   # {attempt}")
            proc = subprocess.run(argv, env=env, check=False, timeout=120)
            if proc.returncode != 0:
                return proc.returncode
        print("\n$ assetd check s3://other-bucket/x.csv   # refused by policy")
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "assetd",
                "check",
                "s3://other-bucket/x.csv",
                "--config",
                str(config),
            ],
            env=env,
            check=False,
            timeout=60,
        )
        if refused.returncode != 1:
            return 1
    print("\ndemo finished: SeaweedFS stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
