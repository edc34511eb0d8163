"""Protocol fuzz against the real daemon: hypothesis frames and random mutations.

Over many connections: 0 crashes (no `internal`, the daemon alive), exactly
one answer per complete line, 0 S3 requests for a source the policy refuses
(counted at a proxy in front of SeaweedFS), and ping still answers.
"""

from __future__ import annotations

import json
import random
import socket
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import BUCKET, HOT_KEYS, PROFILE, scale
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.faultproxy import FaultProxy
from tests.support.seaweedfs import SCOPED_KEY, SeaweedFS

pytestmark = pytest.mark.integration
ALLOWED_PREFIX = "hostile/"
ALLOWED = [f"s3://{BUCKET}/{k}" for k in HOT_KEYS[:3]] + [
    f"s3://{BUCKET}/{ALLOWED_PREFIX}absent.csv"
]
REFUSED = [
    f"s3://{BUCKET}/outside/x.csv",
    f"s3://{BUCKET}/hostilex/x.csv",
    "s3://other-bucket/hostile/x.csv",
    "s3://Bad_Bucket/hostile/k",
    "s3://1.2.3.4/hostile/k",
    "s3://ab/hostile/k",
    f"s3://{BUCKET}/hostile/../outside/x",
    f"s3://{BUCKET}/hostile//x",
    f"s3://{BUCKET}/hostile/\u0000x",
    f"S3://{BUCKET}/hostile/x.csv",
    "http://example.com/hostile/x.csv",
    "file:///etc/passwd",
    "asset://hostile/x",
    "datasets/local.csv",
    "",
    "s3://",
    f"s3://{BUCKET}",
    f"s3://{BUCKET}/",
]
OPS = ["ping", "resolve", "prefetch", "stats", "PING", "delete", ""]
NUMBERS = [0, -1, 1e308, -1e308, 10**400, 3600, 3600.5, 1e-300, 0.5, True, None, "5"]
FRAMES_DONE = {"hypothesis": 0, "mutation": 0}  # frames answered, per test


class Fuzzed:
    """The daemon under fuzz, the proxy counting its S3 requests, and the paths asked."""

    def __init__(self, daemon: DaemonProcess, proxy: FaultProxy, paths: list[str]) -> None:
        self.daemon = daemon
        self.proxy = proxy
        self.paths = paths


@pytest.fixture(scope="module")
def fuzzed(seaweedfs: SeaweedFS, s3: Any) -> Iterator[Fuzzed]:
    """One daemon for the whole module, behind a proxy that records each request path."""
    proxy = FaultProxy(seaweedfs.ports["s3"]).start()
    paths: list[str] = []
    lock = threading.Lock()
    original = proxy._match

    def record(method: str, path: str) -> Any:
        with lock:
            paths.append(path)
        return original(method, path)

    proxy._match = record  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="af", dir="/tmp") as tmp:
        base = socket_dir(Path(tmp))
        sock = str(base / "f.sock")
        config = write_config(
            base / "f.toml",
            {
                "daemon": {"socket": sock},
                # no negative cache: every resolve of an absent key reaches S3 (and its timeout_s)
                "cache": {"dir": str(base / "cache"), "negative_ttl_s": 0},
                "s3": {
                    "endpoint_url": proxy.url,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "allowed_buckets": [BUCKET],
                    "allowed_prefixes": [ALLOWED_PREFIX],
                    "max_object_bytes": "8MiB",
                    "max_attempts": 2,
                },
                "log": {"format": "json", "level": "warning"},
            },
        )
        daemon = DaemonProcess(
            config,
            sock,
            base / "f.log",
            env={"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]},
            grace=2.0,
        ).start()
        try:
            yield Fuzzed(daemon, proxy, paths)
        finally:
            daemon.stop()
            proxy.stop()


def exchange(socket_path: str, frames: list[bytes]) -> list[dict[str, Any]]:
    """Send the frames, one line each, on one connection; every answer until the daemon closes."""
    payload = b"".join(f.replace(b"\n", b" ") + b"\n" for f in frames)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(socket_path)
        received = bytearray()

        def read() -> None:
            while chunk := sock.recv(65536):
                received.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(120)
    return [json.loads(line) for line in bytes(received).splitlines()]


def check_answers(frames: list[bytes], answers: list[dict[str, Any]]) -> None:
    assert len(frames) == len(answers)
    for answer in answers:
        assert isinstance(answer.get("ok"), bool), answer
        if not answer["ok"]:
            assert "internal" != answer["error"]["code"], answer
            assert isinstance(answer["error"]["retryable"], bool)


def check_daemon(fuzzed: Fuzzed) -> None:
    """Alive, ping answers, no internal error, and S3 was asked only about allowed keys."""
    assert fuzzed.daemon.proc is not None
    ping = fuzzed.daemon.request({"op": "ping"})
    stats = fuzzed.daemon.request({"op": "stats"})
    outside = [p for p in fuzzed.paths if not p.startswith(f"/{BUCKET}/{ALLOWED_PREFIX}")]
    print(f"S3: {len(fuzzed.paths)} requests, {len(outside)} outside the allowlists")
    assert None is fuzzed.daemon.proc.poll()
    assert (True, 0) == (ping["ok"], stats["errors"].get("internal", 0))
    assert [] == outside
    assert "Traceback" not in fuzzed.daemon.log()


# -- hypothesis frames ---------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.sampled_from(NUMBERS)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
source = st.sampled_from(ALLOWED + REFUSED) | st.text(max_size=40) | json_value
request = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | st.text(max_size=8) | json_value},
    optional={
        "id": st.integers() | st.text(max_size=12) | json_value,
        "source": source,
        "version_id": st.none() | st.text(max_size=12) | json_value,
        "timeout_s": st.sampled_from(NUMBERS) | st.floats() | json_value,
        "job": st.text(max_size=300) | json_value,
        "sources": st.lists(source | st.fixed_dictionaries({"source": source}), max_size=4)
        | json_value,
    },
)
# well-typed requests with hostile values: these get past decoding to policy and S3
typed = st.fixed_dictionaries(
    {
        "op": st.sampled_from(["resolve", "prefetch"]),
        "source": st.sampled_from(ALLOWED + REFUSED),
        "sources": st.lists(st.sampled_from(ALLOWED + REFUSED), max_size=3),
    },
    optional={
        "id": st.integers(),
        "timeout_s": st.sampled_from(NUMBERS) | st.floats(),
        "job": st.text(max_size=300),
        "version_id": st.none() | st.sampled_from(["null", "v1", "x" * 2000]),
    },
)
frame = (
    typed.map(lambda r: json.dumps(r).encode())
    | request.map(lambda r: json.dumps(r).encode())
    | st.binary(max_size=120)
)
BATCHES = scale(250, 1500)  # of 40 to 60 frames: over 10,000 frames in either profile


def test_hypothesis_frames(fuzzed: Fuzzed) -> None:
    """Hypothesis-built frames, batches on fresh connections: one well-formed answer each."""

    @settings(
        max_examples=BATCHES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        # no shrinking: each step is a round trip to the daemon; the frames are in the report
        phases=(Phase.explicit, Phase.generate),
        derandomize=PROFILE == "short",  # CI sees the same frames every run
    )
    @given(st.lists(frame, min_size=40, max_size=60))
    def batch(frames: list[bytes]) -> None:
        check_answers(frames, exchange(fuzzed.daemon.socket_path, frames))
        FRAMES_DONE["hypothesis"] += len(frames)

    batch()
    print(f"\nhypothesis: {FRAMES_DONE['hypothesis']} frames")
    assert FRAMES_DONE["hypothesis"] >= 10_000
    check_daemon(fuzzed)


# -- random mutation -----------------------------------------------------------------

SEEDS = [
    json.dumps({"op": "resolve", "source": ALLOWED[0], "id": 1, "job": "fuzz"}).encode(),
    json.dumps({"op": "resolve", "source": REFUSED[0], "id": 2, "timeout_s": 5}).encode(),
    json.dumps({"op": "resolve", "source": ALLOWED[-1], "id": 3, "timeout_s": 1e308}).encode(),
    json.dumps({"op": "prefetch", "sources": [ALLOWED[1], {"source": REFUSED[2]}]}).encode(),
    json.dumps({"op": "ping", "id": "p"}).encode(),
    json.dumps({"op": "stats"}).encode(),
]
TOKENS = [b"1e308", b"NaN", b"-Infinity", b"[]", b"{}", b'"', b"\\", b"\\ud800", b"null", b"\xff"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        pos = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] = rng.randrange(256)
        elif kind == 1:
            del out[pos : pos + rng.randint(1, 8)]
        elif kind == 2:
            out[pos:pos] = rng.choice(TOKENS)
        elif kind == 3:
            out[pos:pos] = out[: rng.randint(0, len(out))]
        elif kind == 4:
            out = out[:pos]
        else:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    return bytes(out[: 60 * 1024])


def test_random_mutations_over_many_connections(fuzzed: Fuzzed) -> None:
    """Mutated valid frames, 8 connections at a time: one well-formed answer each, ping lives."""
    rng = random.Random(11)  # noqa: S311  # a fixed seed: the same frames every run
    connections = scale(100, 500)
    batches = [[mutate(rng, rng.choice(SEEDS)) for _ in range(100)] for _ in range(connections)]

    def run(frames: list[bytes]) -> int:
        check_answers(frames, exchange(fuzzed.daemon.socket_path, frames))
        return len(frames)

    with ThreadPoolExecutor(8) as pool:
        FRAMES_DONE["mutation"] = sum(pool.map(run, batches))
    print(f"\nmutation: {FRAMES_DONE['mutation']} frames over {connections} connections")
    assert connections * 100 == FRAMES_DONE["mutation"] >= 10_000
    check_daemon(fuzzed)
