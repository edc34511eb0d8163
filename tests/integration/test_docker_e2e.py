"""An autograder job on a real dockerd: SeaweedFS, the real daemon, pre-flight, placement.

Mirrors the webtech-network autograder: its sandboxes are pre-warmed
containers (``--network none``, a tmpfs ``/tmp``) that exist before the
submission arrives; the assets are resolved pre-flight, then placed, then
the student command runs as a non-root user. Fresh containers get the cache
blobs as read-only bind mounts instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import AssetdClient
from assetd.grader import (
    AssetSourceResolver,
    PreflightError,
    ResolvedAsset,
    docker_mounts,
    parse_assets,
    place_copies,
)
from assetd.grader_docker import inject
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.docker import IMAGE, Dockerd
from tests.support.seaweedfs import SCOPED_BUCKET, SCOPED_KEY, SeaweedFS, ensure_bucket

pytestmark = pytest.mark.integration

BUCKET = SCOPED_BUCKET
MiB = 1 << 20
SIZES = {"small.csv": 1024, "twenty.bin": 20 * MiB, "huge.bin": 200 * MiB}
LIMIT = 200 * MiB
STUDENT = "65534:65534"


def _write_random(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``, written 1 MiB at a time; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(MiB, left))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def objects(seaweedfs: SeaweedFS) -> Iterator[dict[str, str]]:
    """The assignment's objects in SeaweedFS: name -> sha256 (plus one over the size limit)."""
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    digests = {}
    with tempfile.TemporaryDirectory(prefix="dk-obj-") as tmp:
        for name, size in SIZES.items():
            path = Path(tmp) / name
            digests[name] = _write_random(path, size)
            admin.upload_file(str(path), BUCKET, f"datasets/e2e/{name}")
        over = Path(tmp) / "over.bin"
        shutil.copyfile(Path(tmp) / "huge.bin", over)
        with over.open("ab") as f:
            f.write(b"!")  # one byte over max_object_bytes
        admin.upload_file(str(over), BUCKET, "datasets/e2e/over.bin")
    yield digests


@pytest.fixture(scope="module")
def daemon(seaweedfs: SeaweedFS, objects: dict[str, str]) -> Iterator[DaemonProcess]:
    with tempfile.TemporaryDirectory(prefix="dk", dir="/tmp") as tmp:
        base = socket_dir(Path(tmp))
        config = write_config(
            base / "assetd.toml",
            {
                "daemon": {"socket": str(base / "a.sock")},
                "cache": {"dir": str(base / "cache")},
                "s3": {
                    "endpoint_url": seaweedfs.endpoint_url,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "allowed_buckets": [BUCKET],
                    "allowed_prefixes": ["datasets/"],
                    "max_object_bytes": LIMIT,
                },
            },
        )
        proc = DaemonProcess(
            config,
            str(base / "a.sock"),
            base / "assetd.log",
            env={"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]},
        )
        with proc:
            yield proc


@pytest.fixture
def resolver(daemon: DaemonProcess) -> Iterator[AssetSourceResolver]:
    with AssetdClient(daemon.socket_path, timeout=120) as client:
        yield AssetSourceResolver(client=client, timeout_s=120)


@pytest.fixture
def warm(dockerd: Dockerd) -> Iterator[Any]:
    """A pooled sandbox, started before any submission: no network, tmpfs /tmp."""
    container = dockerd.client().containers.run(
        IMAGE,
        ["sleep", "900"],
        detach=True,
        network_mode="none",
        tmpfs={"/tmp": "rw,size=300m,mode=1777"},
    )
    yield container
    container.remove(force=True)


def _setup(*entries: tuple[str, str, bool]) -> dict[str, Any]:
    return {
        "assets": [
            {"source": f"s3://{BUCKET}/datasets/e2e/{name}", "target": target, "read_only": ro}
            for name, target, ro in entries
        ]
    }


ALL = _setup(
    ("small.csv", "/tmp/data/small.csv", True),
    ("twenty.bin", "/tmp/data/twenty.bin", True),
    ("huge.bin", "/tmp/huge.bin", True),
    ("small.csv", "/tmp/work/notes.csv", False),
)


def _run(container: Any, script: str, user: str = STUDENT) -> tuple[int, str]:
    result = container.exec_run(["sh", "-c", script], user=user)
    return result.exit_code, result.output.decode(errors="replace")


def _exec_count(container: Any) -> int:
    """Execs the engine created in this container so far, from its event log."""
    events = container.client.api.events(
        since=0,
        until=time.time() + 1,
        filters={"container": container.id, "event": "exec_create"},
        decode=True,
    )
    return sum(1 for _ in events)


def _preflight(resolver: AssetSourceResolver, setup: dict[str, Any]) -> list[ResolvedAsset]:
    return resolver.resolve_assets(parse_assets(setup), job="e2e-job")


def _job(
    container: Any, resolver: AssetSourceResolver, setup: dict[str, Any], student: str
) -> tuple[int, str]:
    """The autograder's order: every asset pre-flight, then placement, then the student."""
    resolved = _preflight(resolver, setup)
    inject(container, resolved, writable_owner=STUDENT)
    return _run(container, student)


def test_prewarmed_job_student_sees_exact_bytes(
    warm: Any, resolver: AssetSourceResolver, objects: dict[str, str]
) -> None:
    """1 KiB, 20 MiB and 200 MiB reach a warm container's tmpfs /tmp with their sha256."""
    code, out = _job(
        warm,
        resolver,
        ALL,
        "sha256sum /tmp/data/small.csv /tmp/data/twenty.bin /tmp/huge.bin /tmp/work/notes.csv;"
        " echo edit >> /tmp/work/notes.csv && echo rw-ok;"
        " { echo edit >> /tmp/huge.bin; } 2>&1; id -u",
    )
    assert (0, 2) == (code, _exec_count(warm))  # one exec placed all four assets
    assert (
        f"{objects['small.csv']}  /tmp/data/small.csv\n"
        f"{objects['twenty.bin']}  /tmp/data/twenty.bin\n"
        f"{objects['huge.bin']}  /tmp/huge.bin\n"
        f"{objects['small.csv']}  /tmp/work/notes.csv\n"
        "rw-ok\n"
        "sh: can't create /tmp/huge.bin: Permission denied\n"
        "65534\n"
    ) == out


def test_fresh_container_read_only_bind_mounts(
    dockerd: Dockerd, resolver: AssetSourceResolver, objects: dict[str, str], tmp_path: Path
) -> None:
    """Bind mounts: bytes read; root gets EROFS on write and chmod; no AWS_ env; only lo."""
    from docker.types import Mount

    setup = _setup(("twenty.bin", "/data/twenty.bin", True), ("small.csv", "/work/n.csv", False))
    placed = place_copies(_preflight(resolver, setup), tmp_path)
    mounts = [
        Mount(target=m["Target"], source=m["Source"], type="bind", read_only=m["ReadOnly"])
        for m in docker_mounts(placed)
    ]
    out = (
        dockerd.client()
        .containers.run(
            IMAGE,
            [
                "sh",
                "-c",
                "sha256sum /data/twenty.bin; id -u;"
                " chmod 644 /data/twenty.bin 2>&1; { echo x >> /data/twenty.bin; } 2>&1;"
                " echo x >> /work/n.csv && echo rw-ok;"
                " env | grep -c '^AWS_'; ls /sys/class/net",
            ],
            mounts=mounts,
            network_mode="none",
            remove=True,
        )
        .decode()
    )
    assert (
        f"{objects['twenty.bin']}  /data/twenty.bin\n"
        "0\n"
        "chmod: /data/twenty.bin: Read-only file system\n"
        "sh: can't create /data/twenty.bin: Read-only file system\n"
        "rw-ok\n"
        "0\n"
        "lo\n"
    ) == out


def test_inject_reaches_tmpfs_where_put_archive_does_not(
    warm: Any, resolver: AssetSourceResolver, objects: dict[str, str]
) -> None:
    """The tmpfs pitfall: the archive API's copy is invisible, inject's is what runs."""
    resolved = _preflight(resolver, _setup(("small.csv", "/tmp/small.csv", True)))
    from assetd.grader import tar_stream

    assert warm.put_archive("/", b"".join(tar_stream(resolved)))
    assert (1, "") == _run(warm, "cat /tmp/small.csv 2>/dev/null")
    inject(warm, resolved)
    expected = f"{objects['small.csv']}  /tmp/small.csv\n"
    assert (0, expected) == _run(warm, "sha256sum /tmp/small.csv")


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (f"s3://{BUCKET}/datasets/e2e/missing.csv", "not_found"),
        ("s3://not-our-bucket/datasets/x.csv", "not_allowed"),
        (f"s3://{BUCKET}/datasets/e2e/over.bin", "too_large"),
    ],
)
def test_preflight_failure_runs_nothing_in_the_container(
    warm: Any, resolver: AssetSourceResolver, source: str, code: str
) -> None:
    """A bad asset fails pre-flight with its code; no command reaches the sandbox."""
    setup = {"assets": [*ALL["assets"][:1], {"source": source, "target": "/tmp/extra.bin"}]}
    with pytest.raises(PreflightError) as info:
        _job(warm, resolver, setup, "cat /tmp/data/small.csv")
    assert ([code], 0) == (info.value.codes, _exec_count(warm))


def test_daemon_down_fails_preflight_retryable(warm: Any, tmp_path: Path) -> None:
    """No daemon on the socket: pre-flight says unavailable; the container is untouched."""
    with AssetdClient(str(tmp_path / "none.sock")) as client:
        resolver = AssetSourceResolver(client=client)
        with pytest.raises(PreflightError) as info:
            _job(warm, resolver, ALL, "cat /tmp/data/small.csv")
    assert (["unavailable"] * 4, 0) == (info.value.codes, _exec_count(warm))
