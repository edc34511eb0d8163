"""Cold fetch through a shaped network: assetd's verified miss vs boto3, s5cmd and CRT.

Runs on SeaweedFS (never moto). Profiles (``--profile``, comma-separated):

- ``loopback``: straight to SeaweedFS on 127.0.0.1, nothing between;
- ``relay``: through the proxy below with no shaping (its relay's own cost);
- ``wan``: 10 ms each way, 40 MB/s per connection;
- ``far``: 40 ms each way, 80 MB/s per connection.

The shaped profiles go through ``tests/support/shapeproxy.py``, which adds
latency each way, caps every TCP connection's bandwidth and charges a round
trip per new connection. It runs in a process of its own: in this one its
relay threads would take the GIL from the Python tools under test.

For each object size, after one warm-up round, ``--repeats`` rounds each
time every tool once, in turn (interleaved, so machine noise hits all alike).
Removing the previous run's output (assetd's blob, the peers' file) happens
before the clock starts, for every tool alike:

- assetd: ``AssetService.resolve`` into an empty cache: every request, the
  hashing (SHA-256, MD5 where the ETag is one), fsync, rename, index commit;
- boto3 ``download_file`` (default TransferConfig: 10 threads, 8 MiB parts;
  no hashing, no fsync), with a warm client;
- ``s5cmd cp`` (a subprocess per copy, as operators run it);
- boto3's CRT transfer manager (``awscrt``), where it imports: the same
  ``CRTTransferManager`` that ``TransferConfig(preferred_transfer_client="crt")``
  builds, wired to the endpoint (boto3's own factory ignores ``endpoint_url``).

Also reported: requests per assetd cold fetch and per unchanged revalidation
(counted at the proxy; on loopback, by assetd's own counters), the proxy's
own overhead (boto3 through an unshaped proxy vs direct), and peak RSS
growth of a fresh process during one assetd fetch of the largest size.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator
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
from tests.support.shapeproxy import PROFILES as SHAPES
from tests.support.shapeproxy import Shape, ShapingProxyProcess

BUCKET = "bench-assets"
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
SIZES = {"1KiB": KIB, "1MiB": MIB, "16MiB": 16 * MIB, "256MiB": 256 * MIB, "1GiB": GIB}
MULTIPART_MIN = 16 * MIB  # from here, uploaded multipart as operators do: -N ETag
PEERS = ("assetd", "boto3", "s5cmd", "crt")
# "relay" is the proxy unshaped; "loopback" itself uses no proxy at all
PROFILES = {**SHAPES, "relay": SHAPES["loopback"]}
Step = Callable[[], object]
Timer = tuple[Step, Step]  # (untimed setup, timed run)


def _key(label: str) -> str:
    return f"cold/{label}.bin"


class Assetd:
    """A warm daemon-like service; before each timed resolve its blob is discarded.

    The store and its index stay open and warm, as in a running daemon, but
    the object's bytes are gone, so every timed resolve is a real miss.
    """

    def __init__(self, endpoint: str, work: Path) -> None:
        self.work = work
        self.s3 = S3Config(
            endpoint_url=endpoint,
            region="us-east-1",
            addressing_style="path",
            max_object_bytes=4 * GIB,
            deadline_s=600.0,
        )
        session = boto3.session.Session(
            aws_access_key_id=ADMIN_KEY[0], aws_secret_access_key=ADMIN_KEY[1]
        )
        self.fetcher = S3Fetcher(self.s3, session=session)
        cache = work / "assetd-cache"
        shutil.rmtree(cache, ignore_errors=True)
        cfg = load_config(env={"ASSETD_CACHE_DIR": str(cache)})
        cfg = replace(
            cfg,
            s3=self.s3,
            cache=replace(cfg.cache, max_bytes=64 * GIB, min_free_bytes=0, revalidate_after_s=0),
        )
        self.store = Store(cache)
        self.service = AssetService(cfg, self.fetcher, self.store)
        self.fetched: list[str] = []

    def fresh(self) -> None:
        for sha in self.fetched:
            self.store.discard_blob(sha)
        self.fetched.clear()

    def resolve(self, key: str, expect: str = "miss") -> str:
        res = self.service.resolve(f"s3://{BUCKET}/{key}")
        assert res.cache == expect, res.cache
        if expect == "miss":
            self.fetched.append(res.sha256)
        return res.sha256

    def close(self) -> None:
        self.service.close()
        self.store.close()


class Crt:
    """boto3's CRT transfer manager, pointed at ``endpoint`` (None if awscrt is missing)."""

    def __init__(self, endpoint: str) -> None:
        from awscrt.auth import AwsCredentialsProvider
        from s3transfer.crt import (
            BotocoreCRTRequestSerializer,
            CRTTransferManager,
            create_s3_crt_client,
        )

        session = boto3.session.Session(
            aws_access_key_id=ADMIN_KEY[0], aws_secret_access_key=ADMIN_KEY[1]
        )
        creds = AwsCredentialsProvider.new_static(*ADMIN_KEY)
        self.client = create_s3_crt_client(
            "us-east-1", crt_credentials_provider=creds, use_ssl=False
        )
        serializer = BotocoreCRTRequestSerializer(
            session._session,
            {
                "region_name": "us-east-1",
                "endpoint_url": endpoint,
                "aws_access_key_id": ADMIN_KEY[0],
                "aws_secret_access_key": ADMIN_KEY[1],
                "config": BotoConfig(s3={"addressing_style": "path"}),
            },
        )
        self.manager = CRTTransferManager(self.client, serializer)

    def download(self, key: str, dest: Path) -> None:
        self.manager.download(BUCKET, key, str(dest)).result()


def crt_available() -> str | None:
    """None if boto3's CRT path can run here, else why not."""
    try:
        import awscrt  # noqa: F401
        import s3transfer.crt  # noqa: F401
    except ImportError as exc:
        return f"awscrt not installed: {exc}"
    return None


def _time(timer: Timer) -> float:
    setup, run = timer
    setup()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _removing(path: Path) -> Step:
    return lambda: path.unlink(missing_ok=True)


def interleaved(timers: dict[str, Timer], repeats: int) -> dict[str, float]:
    """Median seconds per timer: one warm-up round, then ``repeats`` rounds in turn."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for round_ in range(repeats + 1):
        for name, timer in timers.items():
            took = _time(timer)
            if round_:
                samples[name].append(took)
    return {name: statistics.median(times) for name, times in samples.items()}


def boto3_client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ADMIN_KEY[0],
        aws_secret_access_key=ADMIN_KEY[1],
        region_name="us-east-1",
        config=BotoConfig(s3={"addressing_style": "path"}, max_pool_connections=10),
    )


def s5cmd_timer(endpoint: str, key: str, dest: Path) -> Timer:
    env = clean_env(
        AWS_ACCESS_KEY_ID=ADMIN_KEY[0], AWS_SECRET_ACCESS_KEY=ADMIN_KEY[1], AWS_REGION="us-east-1"
    )
    argv = [
        str(Path(sys.executable).parent / "s5cmd"),
        "--endpoint-url",
        endpoint,
        "cp",
        f"s3://{BUCKET}/{key}",
        str(dest),
    ]
    return _removing(dest), lambda: subprocess.run(
        argv, env=env, check=True, stdout=subprocess.DEVNULL
    )


def proxy_overhead(weed: SeaweedFS, work: Path, labels: list[str], repeats: int) -> dict[str, Any]:
    """boto3 download_file through an unshaped proxy vs straight to SeaweedFS."""
    out: dict[str, Any] = {}
    dest = work / "overhead.bin"
    direct = boto3_client(weed.endpoint_url)
    with ShapingProxyProcess(("127.0.0.1", weed.ports["s3"]), PROFILES["relay"]) as proxy:
        proxied = boto3_client(proxy.url)
        for label in labels:
            key = _key(label)
            got = interleaved(
                {
                    "direct": (
                        _removing(dest),
                        lambda k=key: direct.download_file(BUCKET, k, str(dest)),
                    ),
                    "proxied": (
                        _removing(dest),
                        lambda k=key: proxied.download_file(BUCKET, k, str(dest)),
                    ),
                },
                repeats,
            )
            out[label] = {
                "direct_s": round(got["direct"], 4),
                "proxied_s": round(got["proxied"], 4),
                "ratio": round(got["proxied"] / got["direct"], 3),
            }
    dest.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def network(weed: SeaweedFS, profile: str) -> Iterator[ShapingProxyProcess | None]:
    """The proxy a profile goes through (in a process of its own), or None for loopback."""
    if profile == "loopback":
        yield None
        return
    with ShapingProxyProcess(("127.0.0.1", weed.ports["s3"]), PROFILES[profile]) as proxy:
        yield proxy


def measure_profile(
    weed: SeaweedFS, work: Path, profile: str, *, labels: list[str], repeats: int, peers: list[str]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with network(weed, profile) as proxy:
        endpoint = weed.endpoint_url if proxy is None else proxy.url
        ours = Assetd(endpoint, work)
        client = boto3_client(endpoint)
        crt = Crt(endpoint) if "crt" in peers else None
        dest = work / "peer.bin"

        def methods(key: str) -> dict[str, int]:
            """Requests so far: at the proxy for this key, else assetd's own (one key at a time)."""
            if proxy is not None:
                return dict(proxy.methods(key))
            return {m.upper(): n for m, n in ours.fetcher.requests.items()}

        def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
            return {m: n - before.get(m, 0) for m, n in after.items() if n - before.get(m, 0)}

        try:
            for label in labels:
                key = _key(label)
                requests: list[dict[str, int]] = []

                def assetd_once(k: str = key, seen: list[dict[str, int]] = requests) -> None:
                    before = methods(k)
                    ours.resolve(k)
                    seen.append(delta(before, methods(k)))

                timers: dict[str, Timer] = {}
                if "assetd" in peers:
                    timers["assetd"] = (ours.fresh, assetd_once)
                if "boto3" in peers:
                    timers["boto3"] = (
                        _removing(dest),
                        lambda k=key: client.download_file(BUCKET, k, str(dest)),
                    )
                if "s5cmd" in peers:
                    timers["s5cmd"] = s5cmd_timer(endpoint, key, dest)
                if crt is not None:
                    timers["crt"] = (_removing(dest), lambda k=key: crt.download(k, dest))
                got = interleaved(timers, repeats)
                fig: dict[str, Any] = {f"{name}_s": round(t, 4) for name, t in got.items()}
                if "assetd" in got:
                    for peer in ("boto3", "s5cmd", "crt"):
                        if peer in got:
                            fig[f"vs_{peer}"] = round(got["assetd"] / got[peer], 3)
                    fig["assetd_MBps"] = round(SIZES[label] / got["assetd"] / 1e6, 1)
                    fig["requests_per_cold_fetch"] = requests[-1]
                    # unchanged revalidation (revalidate_after_s = 0): the next resolve
                    before = methods(key)
                    ours.resolve(key, expect="hit")
                    fig["requests_per_revalidation"] = delta(before, methods(key))
                result[label] = fig
        finally:
            ours.close()
            dest.unlink(missing_ok=True)
    return result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def rss_child(endpoint: str, key: str, cache: str) -> None:
    """In a fresh process: peak RSS growth (MiB), sampled every 2 ms, over one cold resolve."""
    ours = Assetd(endpoint, Path(cache))
    ours.fresh()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    ours.resolve(key)
    took = time.perf_counter() - started
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    ours.close()
    print(
        json.dumps({"rss_growth_mib": round((peak[0] - before) / MIB, 1), "took_s": round(took, 3)})
    )


def rss_figure(weed: SeaweedFS, work: Path, profile: str, label: str) -> dict[str, Any]:
    with network(weed, profile) as proxy:
        endpoint = weed.endpoint_url if proxy is None else proxy.url
        child = subprocess.run(
            [sys.executable, __file__, "--rss-child", endpoint, _key(label), str(work / "rss")],
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        )
    shutil.rmtree(work / "rss", ignore_errors=True)
    return {"object": label, **json.loads(child.stdout)}


def upload(weed: SeaweedFS, work: Path, labels: list[str]) -> None:
    client = weed.client()
    client.create_bucket(Bucket=BUCKET)
    for label in labels:
        size = SIZES[label]
        if size < MULTIPART_MIN:
            client.put_object(Bucket=BUCKET, Key=_key(label), Body=os.urandom(size))
            continue
        src = work / "upload.src"
        with src.open("wb") as f:
            for _ in range(size // MIB):
                f.write(os.urandom(MIB))
        client.upload_file(str(src), BUCKET, _key(label), Config=TransferConfig())
        src.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--profile", default="loopback,wan", help="comma-separated: " + ",".join(PROFILES)
    )
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="comma-separated subset of " + ",".join(SIZES)
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child")
    parser.add_argument("--rss-child", nargs=3, metavar=("ENDPOINT", "KEY", "CACHE"))
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    profiles = [p for p in args.profile.split(",") if p]
    labels = [s for s in args.sizes.split(",") if s]
    peers = [p for p in args.peers.split(",") if p]
    for name in profiles:
        if name not in PROFILES:
            parser.error(f"unknown profile {name!r}")
    for label in labels:
        if label not in SIZES:
            parser.error(f"unknown size {label!r}")
    labels.sort(key=SIZES.__getitem__)
    result: dict[str, Any] = {
        "engine": "seaweedfs",
        "repeats": args.repeats,
        "load_average": os.getloadavg()[0],
        "profiles": {n: vars_of(PROFILES[n]) if n != "loopback" else "direct" for n in profiles},
    }
    crt_missing = crt_available() if "crt" in peers else None
    if crt_missing:
        peers.remove("crt")
        result["crt_skipped"] = crt_missing
    with tempfile.TemporaryDirectory(prefix="assetd-bench-") as tmp, SeaweedFS() as weed:
        work = Path(tmp)
        upload(weed, work, labels)
        small = labels[0]
        big = [label for label in labels if SIZES[label] <= 256 * MIB][-1]
        result["proxy_overhead"] = proxy_overhead(weed, work, sorted({small, big}), args.repeats)
        for name in profiles:
            result[name] = measure_profile(
                weed, work, name, labels=labels, repeats=args.repeats, peers=peers
            )
        if not args.no_rss:
            result["rss"] = rss_figure(weed, work, profiles[-1], labels[-1])
            result["rss"]["profile"] = profiles[-1]
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result))


def vars_of(shape: Shape) -> dict[str, Any]:
    return {"latency_ms": shape.latency_s * 1000, "MBps_per_conn": (shape.rate_bps or 0) / 1e6}


if __name__ == "__main__":
    main()
