"""inject(): assets into a running container through one exec, on a real dockerd."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from assetd import grader_docker
from assetd.errors import BadRequest, Unavailable
from assetd.grader import AssetSpec, ResolvedAsset
from assetd.grader_docker import inject
from tests.support.docker import IMAGE, IMAGE_GNU, IMAGE_NO_TAR, Dockerd


def _asset(tmp_path: Path, target: str, data: bytes, read_only: bool = True) -> ResolvedAsset:
    path = tmp_path / hashlib.sha256(target.encode()).hexdigest()[:16]
    path.write_bytes(data)
    return ResolvedAsset(AssetSpec("s3://b/k", target, read_only), path, len(data))


def _sh(container: Any, script: str, user: str = "0") -> tuple[int, str]:
    result = container.exec_run(["sh", "-c", script], user=user)
    return result.exit_code, result.output.decode()


def _listing(container: Any, *dirs: str) -> str:
    """Every name under ``dirs`` (hidden staging files included), or '' if none exist."""
    return _sh(container, f"find {' '.join(dirs)} 2>/dev/null | sort")[1]


def _exec_count(container: Any) -> int:
    """How many execs the engine created in this container so far (its event log)."""
    events = container.client.api.events(
        since=0,
        until=time.time() + 1,
        filters={"container": container.id, "event": "exec_create"},
        decode=True,
    )
    return sum(1 for _ in events)


@pytest.fixture
def warm(dockerd: Dockerd) -> Iterator[Any]:
    """A pre-warmed sandbox as the autograder makes them: no network, tmpfs /tmp, no caps."""
    container = dockerd.client().containers.run(
        IMAGE,
        ["sleep", "600"],
        detach=True,
        network_mode="none",
        tmpfs={"/tmp": "rw,size=64m,mode=1777"},
        cap_drop=["ALL"],
    )
    yield container
    container.remove(force=True)


def test_places_bytes_modes_and_parents_on_tmpfs(warm: Any, tmp_path: Path) -> None:
    """Bytes, root ownership, 0444/0644 and new 0755 parents, under a tmpfs /tmp, in one exec."""
    data = os.urandom(3 << 20)
    assets = [
        _asset(tmp_path, "/tmp/d/e/big.bin", data),
        _asset(tmp_path, "/data/notes.txt", b"rw", read_only=False),
        _asset(tmp_path, "/tmp/empty", b""),
    ]
    result = inject(warm, assets)
    _, out = _sh(
        warm,
        "sha256sum /tmp/d/e/big.bin | cut -d' ' -f1;"
        " stat -c '%n %a %u:%g %s' /tmp/d /tmp/d/e /tmp/d/e/big.bin /data/notes.txt /tmp/empty",
    )
    assert (
        f"{hashlib.sha256(data).hexdigest()}\n"
        "/tmp/d 755 0:0 60\n"
        "/tmp/d/e 755 0:0 60\n"
        f"/tmp/d/e/big.bin 444 0:0 {len(data)}\n"
        "/data/notes.txt 644 0:0 2\n"
        "/tmp/empty 444 0:0 0\n"
    ) == out
    assert ("tar", 1, 1) == (result.method, result.exec_calls, _exec_count(warm) - 1)


def test_tmpfs_target_visible_where_put_archive_is_not(warm: Any, tmp_path: Path) -> None:
    """The archive API lands under the tmpfs and is invisible; inject is seen by the sandbox."""
    asset = _asset(tmp_path, "/tmp/seen.txt", b"inject")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        info = tarfile.TarInfo("tmp/archived.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"api"))
    assert warm.put_archive("/", archive.getvalue())
    inject(warm, [asset])
    assert "/tmp\n/tmp/seen.txt\n" == _listing(warm, "/tmp")


def test_non_root_cannot_write_read_only_asset(warm: Any, tmp_path: Path) -> None:
    """A sandbox user (65534) can read a read-only asset but neither write nor replace it."""
    inject(warm, [_asset(tmp_path, "/tmp/ro/x.csv", b"a,b\n")])
    _, out = _sh(
        warm,
        "cat /tmp/ro/x.csv; echo tamper >> /tmp/ro/x.csv && echo WROTE;"
        " rm -f /tmp/ro/x.csv && echo REMOVED; cat /tmp/ro/x.csv",
        user="65534",
    )
    assert "WROTE" not in out and "REMOVED" not in out
    assert 2 == out.count("a,b"), out


def test_replaces_previous_jobs_read_only_asset(warm: Any, tmp_path: Path) -> None:
    """A pooled container reused for the next job gets the new bytes over an old 0444 file."""
    (tmp_path / "old").mkdir()
    inject(warm, [_asset(tmp_path / "old", "/tmp/r.csv", b"old job")])
    inject(warm, [_asset(tmp_path, "/tmp/r.csv", b"new job")])
    assert (0, "new job") == _sh(warm, "cat /tmp/r.csv")


def test_image_without_tar_falls_back_to_dd(dockerd: Dockerd, tmp_path: Path) -> None:
    """No tar in the image: auto retries with dd, bodies split exactly between files."""
    container = dockerd.client().containers.run(
        IMAGE_NO_TAR, ["sleep", "600"], detach=True, network_mode="none", tmpfs={"/tmp": ""}
    )
    try:
        one, two = os.urandom(100_001), os.urandom(70_000)
        assets = [
            _asset(tmp_path, "/tmp/a/one", one),
            _asset(tmp_path, "/tmp/empty", b""),
            _asset(tmp_path, "/tmp/two", two, read_only=False),
        ]
        result = inject(container, assets)
        _, out = _sh(container, "sha256sum /tmp/a/one /tmp/two; stat -c '%a %s' /tmp/empty")
        expected = (
            f"{hashlib.sha256(one).hexdigest()}  /tmp/a/one\n"
            f"{hashlib.sha256(two).hexdigest()}  /tmp/two\n444 0\n"
        )
        assert (expected, "dd", 2) == (out, result.method, result.exec_calls)
        with pytest.raises(Unavailable) as info:
            inject(container, assets, method="tar")
        assert "the container has no tar (use method='dd')" in info.value.message
    finally:
        container.remove(force=True)


def test_full_tmpfs_is_unavailable_and_places_nothing(dockerd: Dockerd, tmp_path: Path) -> None:
    """A write that runs out of room is a retryable error; no asset, no staging file left."""
    container = dockerd.client().containers.run(
        IMAGE, ["sleep", "600"], detach=True, network_mode="none", tmpfs={"/tmp": "size=1m"}
    )
    try:
        assets = [
            _asset(tmp_path, "/tmp/small.txt", b"fits"),
            _asset(tmp_path, "/tmp/big.bin", os.urandom(2 << 20)),
        ]
        for method in ("tar", "dd"):
            with pytest.raises(Unavailable) as info:
                inject(container, assets, method=method)
            assert (True, "/tmp\n") == (info.value.retryable, _listing(container, "/tmp"))
    finally:
        container.remove(force=True)


def test_stream_cut_short_places_nothing(
    warm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive that ends mid-file (tar exits non-zero) leaves no asset, half or whole."""
    data = os.urandom(1 << 20)
    assets = [_asset(tmp_path, "/tmp/first.txt", b"ok"), _asset(tmp_path, "/tmp/x/cut.bin", data)]
    real = grader_docker.tar_stream

    def cut(items: Any, *, chunk_size: int) -> Iterator[bytes]:
        sent = 0
        for chunk in real(items, chunk_size=4096):
            sent += len(chunk)
            if sent > 1536 + len(data) // 2:
                return
            yield chunk

    monkeypatch.setattr(grader_docker, "tar_stream", cut)
    with pytest.raises(Unavailable) as info:
        inject(warm, assets)
    assert "could not place assets in the sandbox: the archive could not be extracted" == (
        info.value.message
    )
    assert "/tmp\n/tmp/x\n" == _listing(warm, "/tmp")


def test_blob_shrinking_mid_send_places_nothing(warm: Any, tmp_path: Path) -> None:
    """A blob shorter than announced ends the stream; the error is retryable, nothing placed."""
    asset = _asset(tmp_path, "/tmp/s.bin", b"x" * 1000)
    short = ResolvedAsset(asset.spec, asset.path, 5000)
    with pytest.raises(Unavailable) as info:
        inject(warm, [short], method="dd")
    assert ("unavailable", "/tmp\n") == (info.value.code, _listing(warm, "/tmp"))


def test_size_mismatch_is_caught_in_the_container(warm: Any, tmp_path: Path) -> None:
    """The container checks each staged file's size against the resolved size."""
    asset = _asset(tmp_path, "/tmp/m.bin", b"y" * 1000)
    wrong = ResolvedAsset(asset.spec, asset.path, 999)
    with pytest.raises(Unavailable) as info:
        inject(warm, [wrong], method="tar")
    assert "could not place assets in the sandbox: an asset arrived short" == info.value.message
    assert "/tmp\n" == _listing(warm, "/tmp")


def test_directory_at_target_is_refused(warm: Any, tmp_path: Path) -> None:
    """An existing directory at a target is an error, not a file moved inside it."""
    _sh(warm, "mkdir -p /tmp/dir")
    with pytest.raises(Unavailable) as info:
        inject(warm, [_asset(tmp_path, "/tmp/dir", b"z")])
    assert "a target is an existing directory" in info.value.message
    assert "/tmp\n/tmp/dir\n" == _listing(warm, "/tmp")


@pytest.mark.parametrize("target", ["relative/x", "/proc/x", "/tmp/../etc/passwd", "/"])
def test_targets_validated_before_any_exec(warm: Any, tmp_path: Path, target: str) -> None:
    """Targets go through the bind-mount validation; a bad one runs nothing in the container."""
    good = _asset(tmp_path, "/tmp/ok", b"ok")
    bad = ResolvedAsset(AssetSpec("s3://b/k", target), good.path, 2)
    before = _exec_count(warm)
    with pytest.raises(BadRequest):
        inject(warm, [good, bad])
    assert before == _exec_count(warm)


def test_duplicate_targets_rejected(warm: Any, tmp_path: Path) -> None:
    """Two assets for one target are a bad request, as in parse_assets."""
    asset = _asset(tmp_path, "/tmp/dup", b"d")
    with pytest.raises(BadRequest):
        inject(warm, [asset, asset])


def test_engine_refusing_exec_is_unavailable(dockerd: Dockerd, tmp_path: Path) -> None:
    """A stopped container (the engine refuses the exec) is a retryable error."""
    container = dockerd.client().containers.create(IMAGE, ["sleep", "600"], network_mode="none")
    try:
        with pytest.raises(Unavailable) as info:
            inject(container, [_asset(tmp_path, "/tmp/a", b"a")])
        assert info.value.retryable
    finally:
        container.remove(force=True)


class _GoneEngine:
    """A docker SDK APIClient whose engine stops answering at call ``fail_at`` (a restart)."""

    def __init__(self, fail_at: str) -> None:
        self.fail_at = fail_at
        self.ours, self.theirs = socket.socketpair()  # the exec's stdin/stdout stream

    def _call(self, name: str) -> None:
        if name == self.fail_at:
            raise requests.exceptions.ConnectionError("Connection aborted: engine went away")

    def exec_create(self, *args: Any, **kw: Any) -> dict[str, str]:
        self._call("exec_create")
        return {"Id": "e0"}

    def exec_start(self, *args: Any, **kw: Any) -> socket.socket:
        self._call("exec_start")
        return self.ours

    def exec_inspect(self, *args: Any, **kw: Any) -> dict[str, Any]:
        self._call("exec_inspect")
        return {"Running": True, "ExitCode": None}


@pytest.mark.parametrize("fail_at", ["exec_create", "exec_start", "exec_inspect"])
def test_engine_going_away_is_unavailable(tmp_path: Path, fail_at: str) -> None:
    """The engine's connection failing (dockerd restarting) is a retryable unavailable."""
    engine = _GoneEngine(fail_at)
    container = type("Container", (), {"id": "c0" * 32, "client": type("C", (), {"api": engine})})
    try:
        with pytest.raises(Unavailable) as info:
            inject(container, [_asset(tmp_path, "/tmp/a", b"a")], method="tar", timeout_s=1.0)
        assert info.value.retryable
    finally:
        engine.theirs.close()


def test_grader_imports_without_docker_sdk() -> None:
    """assetd.grader and assetd.grader_docker import where the docker SDK is not installed."""
    code = (
        "import sys; sys.modules['docker'] = None\n"
        "import assetd.grader, assetd.grader_docker\n"
        "print(sorted(m for m in sys.modules if m.startswith('docker')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert (0, "['docker']\n") == (proc.returncode, proc.stdout), proc.stderr


def test_exec_that_stops_reading_times_out(
    warm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exec that neither reads nor exits is given up after timeout_s, as unavailable."""
    monkeypatch.setattr(grader_docker, "_script", lambda *a: "sleep 20\n")
    with pytest.raises(Unavailable) as info:
        inject(warm, [_asset(tmp_path, "/tmp/t.bin", os.urandom(8 << 20))], timeout_s=1.0)
    assert info.value.retryable


def test_failure_logged_through_stdlib_logging(
    warm: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """The exit code and output go to the 'assetd' stdlib logger, nothing to stdout."""
    _sh(warm, "mkdir -p /tmp/d2")
    with caplog.at_level(logging.WARNING, logger="assetd"), pytest.raises(Unavailable):
        inject(warm, [_asset(tmp_path, "/tmp/d2", b"z")])
    records = [r for r in caplog.records if r.name.startswith("assetd.")]
    assert [("WARNING", True)] == [(r.levelname, "exit code 68" in r.getMessage()) for r in records]
    assert "" == capsys.readouterr().out


@pytest.mark.parametrize("method", ["tar", "dd"])
def test_targets_with_quotes_spaces_unicode_and_long_paths(
    warm: Any, tmp_path: Path, method: str
) -> None:
    """Shell-special, non-ASCII and 250-byte targets land exactly where named."""
    targets = [
        '/tmp/my data/it\'s "q" $HOME `id`.csv',
        "/tmp/ação/dados é.csv",
        "/tmp/" + "/".join(["d" * 60] * 4) + "/file.csv",
    ]
    assets = [_asset(tmp_path, t, t.encode()) for t in targets]
    inject(warm, assets, method=method)
    got = [warm.exec_run(["cat", t]).output.decode() for t in targets]
    assert targets == got


@pytest.mark.parametrize("method", ["tar", "dd"])
def test_gnu_tar_and_coreutils(dockerd: Dockerd, tmp_path: Path, method: str) -> None:
    """With dash, GNU tar and coreutils: bytes and modes right; a full tmpfs leaves nothing."""
    client = dockerd.client()
    if not client.images.list(name=IMAGE_GNU):
        pytest.skip("no GNU userland on this host to build the image from")
    container = client.containers.run(
        IMAGE_GNU,
        ["sleep", "600"],
        detach=True,
        network_mode="none",
        tmpfs={"/tmp": "size=2m"},
        cap_drop=["ALL"],
    )
    try:
        data = os.urandom(100_001)
        inject(container, [_asset(tmp_path, "/tmp/g/a.bin", data)], method=method)
        _, out = _sh(container, "sha256sum /tmp/g/a.bin; stat -c '%a %u' /tmp/g/a.bin /tmp/g")
        assert f"{hashlib.sha256(data).hexdigest()}  /tmp/g/a.bin\n444 0\n755 0\n" == out
        big = _asset(tmp_path, "/tmp/big.bin", os.urandom(3 << 20))
        with pytest.raises(Unavailable):
            inject(container, [big], method=method)
        assert "/tmp\n/tmp/g\n/tmp/g/a.bin\n" == _listing(container, "/tmp")
    finally:
        container.remove(force=True)
