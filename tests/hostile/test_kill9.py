"""Hostile suite: kill -9 during mixed resolves, downloads and evictions (issue 11, Build 9).

``ASSETD_HOSTILE_PROFILE=short`` kills 30 times, ``full`` 200. A small cache
with no pins keeps eviction churning, so most resolves download. After the
last kill: 0 blobs whose bytes differ from their name, 0 index rows naming a
missing or wrong blob, 0 temp files after restart, 0 wrong bytes read by any
client during the run, and 0 failed re-resolves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import diskcache
import pytest

from tests.hostile.conftest import BUCKET, Factory, scale

pytestmark = pytest.mark.integration


def _rows_naming_bad_blobs(cache: Path) -> list[Any]:
    bad = []
    with diskcache.Cache(str(cache / "index")) as index:
        for k in list(index.iterkeys()):
            if k[0] != "obj":
                continue
            sha = index.get(k)["sha256"]
            path = cache / "blobs" / "sha256" / sha[:2] / sha
            if (
                ("blob", sha) not in index
                or not path.exists()
                or hashlib.sha256(path.read_bytes()).hexdigest() != sha
            ):
                bad.append(k)
    return bad


@pytest.mark.timeout(scale(300, 1500))
def test_kill_9_during_mixed_load(s3: Any, make_daemon: Factory) -> None:
    """Hundreds of kill -9 mid-download, mid-commit, mid-eviction: the cache stays exact."""
    kills_wanted = scale(30, 200)
    rng = random.Random(20261130)  # noqa: S311 - reproducible kill moments, not secrets
    objects: dict[str, str] = {}
    for i, size in enumerate([16 << 10, 200 << 10, 700 << 10, 1 << 20, 2 << 20, 3 << 20]):
        data = os.urandom(size)
        key = f"hostile/kill9/{i}.bin"
        objects[key] = hashlib.sha256(data).hexdigest()
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
    d = make_daemon(
        name="k9",
        start=False,
        cache={"max_bytes": "5MiB", "min_free_bytes": 0, "pin_seconds": 0},
    )
    cache = Path(d.config.read_text().split('dir = "')[1].split('"')[0])
    wrong_reads: list[str] = []
    answered = 0
    started = time.monotonic()

    def client(key: str) -> None:
        nonlocal answered
        with contextlib.suppress(OSError, ValueError):  # the daemon dies under it: the point
            answer = d.request({"op": "resolve", "source": f"s3://{BUCKET}/{key}"}, timeout=30)
            if not answer.get("ok"):
                return
            answered += 1
            try:
                data = Path(answer["path"]).read_bytes()
            except FileNotFoundError:
                return  # evicted at once: pin_seconds is 0
            if hashlib.sha256(data).hexdigest() != objects[key]:
                wrong_reads.append(key)

    kills = 0
    for _ in range(kills_wanted):
        d.start()
        keys = [rng.choice(list(objects)) for _ in range(8)]
        threads = [threading.Thread(target=client, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.0, 0.3))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        d.proc = None
        kills += 1
        for t in threads:
            t.join(30)
    bad_blobs = [
        b.name
        for b in (cache / "blobs" / "sha256").glob("*/*")
        if hashlib.sha256(b.read_bytes()).hexdigest() != b.name
    ]
    d.start()
    deadline = time.monotonic() + 60
    while '"cache recovered"' not in d.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    d.stop()
    bad_rows = _rows_naming_bad_blobs(cache)
    temps = list((cache / "tmp").iterdir())
    d.start()
    again = {
        key: d.request({"op": "resolve", "source": f"s3://{BUCKET}/{key}"}, timeout=60)
        for key in objects
    }
    failed = [k for k, a in again.items() if a.get("sha256") != objects[k]]
    seconds = round(time.monotonic() - started, 1)
    print(
        json.dumps(
            {
                "test": "kill_9",
                "kills": kills,
                "answers_before_kills": answered,
                "bad_blobs": len(bad_blobs),
                "bad_rows": len(bad_rows),
                "temps_after_restart": len(temps),
                "wrong_reads": len(wrong_reads),
                "failed_re_resolves": len(failed),
                "seconds": seconds,
            }
        )
    )
    assert kills_wanted == kills
    assert ([], [], [], [], []) == (bad_blobs, bad_rows, temps, wrong_reads, failed)
