"""Cold fetch: assetd's verified, fsynced, committed miss vs boto3, s5cmd and a floor.

Runs on SeaweedFS (never moto). For 1 MiB and 256 MiB objects, after one
warm-up, takes the median of --runs timings of:

- assetd: ``AssetService.resolve`` into an empty cache (HEAD, GET, SHA-256
  and MD5 where the ETag is one, fsync, rename, index commit);
- boto3 ``download_file`` to a local file (no hashing, no fsync);
- ``s5cmd cp`` to a local file (a subprocess, as operators run it);
- floor: one plain http.client GET of a presigned URL, SHA-256 in the same
  pass, written to a file, then fsync.

Also reports peak RSS growth of a fresh process while assetd fills 256 MiB.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig

from assetd.config import S3Config, load_config
from assetd.fetcher.s3 import S3Fetcher
from assetd.service import AssetService
from assetd.store import Store
from tests.support.seaweedfs import ADMIN_KEY, SeaweedFS, clean_env

BUCKET = "bench-assets"
MIB = 1 << 20


def _median(
    fn: Callable[[], object], runs: int, setup: Callable[[], object] | None = None
) -> float:
    times = []
    for i in range(runs + 1):  # the first run is the warm-up
        if setup is not None:
            setup()
        started = time.perf_counter()
        fn()
        took = time.perf_counter() - started
        if i:
            times.append(took)
    return statistics.median(times)


def _floor(url: str, dest: Path) -> str:
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port)
    conn.request("GET", f"{u.path}?{u.query}")
    resp = conn.getresponse()
    sha = hashlib.sha256()
    with dest.open("wb") as f:
        while chunk := resp.read(MIB):
            sha.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    conn.close()
    return sha.hexdigest()


class Assetd:
    """A warm daemon-like service; before each timed resolve its blob is discarded.

    The store and its index stay open and warm, as in a running daemon, but
    the object's bytes are gone, so every timed resolve is a real miss.
    """

    def __init__(self, weed: SeaweedFS, work: Path) -> None:
        self.work = work
        self.s3 = S3Config(
            endpoint_url=weed.endpoint_url, region="us-east-1", addressing_style="path"
        )
        self.session = boto3.session.Session(
            aws_access_key_id=ADMIN_KEY[0], aws_secret_access_key=ADMIN_KEY[1]
        )
        self.fetcher = S3Fetcher(self.s3, session=self.session)
        self.service: AssetService | None = None
        self.fetched: list[str] = []
        self.store: Store | None = None

    def fresh(self) -> None:
        if self.service is None:
            cache = self.work / "assetd-cache"
            shutil.rmtree(cache, ignore_errors=True)
            cfg = load_config(env={"ASSETD_CACHE_DIR": str(cache)})
            self.store = Store(cache)
            self.service = AssetService(replace(cfg, s3=self.s3), self.fetcher, self.store)
        assert self.store is not None
        for sha in self.fetched:
            self.store.discard_blob(sha)
        self.fetched.clear()

    def resolve(self, key: str) -> str:
        assert self.service is not None
        res = self.service.resolve(f"s3://{BUCKET}/{key}")
        assert res.cache == "miss"
        self.fetched.append(res.sha256)
        return res.sha256

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
        if self.store is not None:
            self.store.close()
        self.service = self.store = None


def measure(weed: SeaweedFS, work: Path, key: str, runs: int) -> dict[str, float]:
    client = boto3.session.Session().client(
        "s3",
        config=BotoConfig(s3={"addressing_style": "path"}),
        **weed.client_kwargs(),
    )
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    env = clean_env(
        AWS_ACCESS_KEY_ID=ADMIN_KEY[0], AWS_SECRET_ACCESS_KEY=ADMIN_KEY[1], AWS_REGION="us-east-1"
    )
    s5cmd = str(Path(sys.executable).parent / "s5cmd")
    dest = work / "out.bin"
    ours = Assetd(weed, work)
    try:
        figures = {
            "assetd_s": _median(lambda: ours.resolve(key), runs, setup=ours.fresh),
            "boto3_s": _median(lambda: client.download_file(BUCKET, key, str(dest)), runs),
            "s5cmd_s": _median(
                lambda: subprocess.run(
                    [
                        s5cmd,
                        "--endpoint-url",
                        weed.endpoint_url,
                        "cp",
                        f"s3://{BUCKET}/{key}",
                        str(dest),
                    ],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                ),
                runs,
            ),
            "floor_s": _median(lambda: _floor(url, dest), runs),
        }
    finally:
        ours.close()
    figures["vs_boto3"] = figures["assetd_s"] / figures["boto3_s"]
    figures["vs_s5cmd"] = figures["assetd_s"] / figures["s5cmd_s"]
    figures["vs_floor"] = figures["assetd_s"] / figures["floor_s"]
    return {k: round(v, 4) for k, v in figures.items()}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_child(endpoint: str, key: str, cache: str) -> None:
    """In a fresh process: peak RSS growth (MiB), sampled every 2 ms, over one cold resolve."""
    weed = SeaweedFS()
    weed.ports = {"s3": int(endpoint.rsplit(":", 1)[1])}
    ours = Assetd(weed, Path(cache))
    ours.fresh()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    ours.resolve(key)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    ours.close()
    print(json.dumps({"rss_growth_mib": round((peak[0] - before) / MIB, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rss-child", nargs=3, metavar=("ENDPOINT", "KEY", "CACHE"))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    with tempfile.TemporaryDirectory(prefix="assetd-bench-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        client = weed.client()
        client.create_bucket(Bucket=BUCKET)
        small = os.urandom(MIB)
        client.put_object(Bucket=BUCKET, Key="one-mib.bin", Body=small)
        big = work / "big.src"
        with big.open("wb") as f:
            for _ in range(256):
                f.write(os.urandom(MIB))
        # multipart, as operators upload large datasets: the ETag is -N, SHA-256 only
        client.upload_file(str(big), BUCKET, "big.bin", Config=TransferConfig())
        big.unlink()
        result: dict[str, Any] = {
            "engine": "seaweedfs",
            "runs": args.runs,
            "1MiB": measure(weed, work, "one-mib.bin", args.runs),
            "256MiB": measure(weed, work, "big.bin", args.runs),
        }
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                weed.endpoint_url,
                "big.bin",
                str(work / "rss"),
            ],
            env=clean_env(AWS_ACCESS_KEY_ID=ADMIN_KEY[0], AWS_SECRET_ACCESS_KEY=ADMIN_KEY[1]),
            capture_output=True,
            text=True,
            check=True,
        )
        result.update(json.loads(child.stdout))
        big_fig = result["256MiB"]
        result["targets"] = {
            "256MiB_vs_boto3_le_0.8": big_fig["vs_boto3"] <= 0.8,
            "256MiB_vs_s5cmd_le_1.0": big_fig["vs_s5cmd"] <= 1.0,
            "256MiB_vs_floor_le_1.25": big_fig["vs_floor"] <= 1.25,
            "1MiB_le_5ms": result["1MiB"]["assetd_s"] <= 0.005,
            "rss_growth_le_64MiB": result["rss_growth_mib"] <= 64,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
