"""Unit tests for the cache maintenance commands: ``assetd gc`` and ``assetd verify``."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from assetd.cli import cli
from assetd.store import Store

FAR = 1e12  # a pin that never runs out during a test


def run(*args: str) -> Result:
    """Invoke the CLI in-process, keeping stdout and stderr apart."""
    return CliRunner().invoke(cli, list(args), prog_name="assetd")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _data(i: int) -> bytes:
    return bytes([i]) * 100


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """The cache directory the config file names."""
    return tmp_path / "cache"


def _config(tmp_path: Path, cache_dir: Path, max_bytes: int) -> str:
    path = tmp_path / "assetd.toml"
    path.write_text(
        f'[daemon]\nsocket = "{tmp_path / "none.sock"}"\n'  # no daemon: the offline path
        f'[cache]\ndir = "{cache_dir}"\nmax_bytes = {max_bytes}\nmin_free_bytes = 0\n'
        '[log]\nlevel = "error"\n'
    )
    return str(path)


def _populate(cache_dir: Path, n: int, *, pinned_until: float = 0.0) -> list[Path]:
    """Commit n entries of 100 distinct bytes each; returns their blob paths, oldest first."""
    store = Store(cache_dir)
    paths = []
    try:
        for i in range(n):
            data = _data(i)
            with store.staged() as st:
                st.write(memoryview(data))
                _, path = store.commit(
                    st,
                    bucket="bucket",
                    key=f"k{i}",
                    sha256=_sha(data),
                    size=len(data),
                    etag=f'"e{i}"',
                    version_id=None,
                    requested_version=None,
                    pinned_until=pinned_until,
                )
            paths.append(path)
    finally:
        store.close()
    return paths


def _totals(cache_dir: Path) -> tuple[int, int]:
    store = Store(cache_dir)
    try:
        return store.totals()
    finally:
        store.close()


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    path.write_bytes(b"X" * path.stat().st_size)


# -- gc -----------------------------------------------------------------------------------------


def test_gc_json_evicts_over_max_bytes(tmp_path: Path, cache_dir: Path) -> None:
    """gc --json on a cache over max_bytes evicts LRU entries, reports freed bytes, exits 0."""
    paths = _populate(cache_dir, 3)
    result = run("gc", "--json", "--config", _config(tmp_path, cache_dir, 250))
    assert 0 == result.exit_code, result.output
    report = json.loads(result.stdout)
    assert {"recovery", "eviction", "quarantine_removed", "via"} == set(report)
    assert "offline" == report["via"]
    eviction = report["eviction"]
    assert 100 == eviction["freed_bytes"]  # 300 -> 200, under the low water mark of 225
    assert 1 == eviction["removed_entries"]
    assert 1 == eviction["removed_blobs"]
    assert 200 == eviction["bytes_after"]
    assert eviction["full"] is False
    assert 3 == report["recovery"]["entries"]
    assert not paths[0].exists()
    assert paths[1].exists()
    assert paths[2].exists()
    assert (2, 200) == _totals(cache_dir)


def test_gc_text_output(tmp_path: Path, cache_dir: Path) -> None:
    """gc without --json prints one summary line."""
    _populate(cache_dir, 3)
    result = run("gc", "--config", _config(tmp_path, cache_dir, 250))
    assert 0 == result.exit_code, result.output
    assert result.stdout.startswith("freed 100 bytes: 1 entries, 1 blobs; 200 bytes cached")
    assert "still over the limits" not in result.stdout


def test_gc_under_limits_frees_nothing(tmp_path: Path, cache_dir: Path) -> None:
    """gc on a cache within its limits frees nothing and exits 0."""
    paths = _populate(cache_dir, 3)
    result = run("gc", "--json", "--config", _config(tmp_path, cache_dir, 1000))
    assert 0 == result.exit_code, result.output
    assert 0 == json.loads(result.stdout)["eviction"]["freed_bytes"]
    assert all(p.exists() for p in paths)


def test_gc_all_pinned_exits_1_full(tmp_path: Path, cache_dir: Path) -> None:
    """gc when everything is pinned deletes nothing, reports full and exits 1."""
    paths = _populate(cache_dir, 3, pinned_until=FAR)
    result = run("gc", "--json", "--config", _config(tmp_path, cache_dir, 250))
    assert 1 == result.exit_code, result.output
    eviction = json.loads(result.stdout)["eviction"]
    assert eviction["full"] is True
    assert 0 == eviction["freed_bytes"]
    assert 0 == eviction["removed_entries"]
    assert all(p.exists() for p in paths)
    assert (3, 300) == _totals(cache_dir)


def test_gc_all_pinned_text_says_so(tmp_path: Path, cache_dir: Path) -> None:
    """The text form of a full gc says why it could not meet the limits."""
    _populate(cache_dir, 3, pinned_until=FAR)
    result = run("gc", "--config", _config(tmp_path, cache_dir, 250))
    assert 1 == result.exit_code, result.output
    assert "still over the limits (everything left is pinned)" in result.stdout


def test_gc_runs_recovery_first(tmp_path: Path, cache_dir: Path) -> None:
    """gc recovers the index first: a deleted blob's rows are dropped and reported."""
    paths = _populate(cache_dir, 2)
    paths[0].unlink()
    result = run("gc", "--json", "--config", _config(tmp_path, cache_dir, 1000))
    assert 0 == result.exit_code, result.output
    recovery = json.loads(result.stdout)["recovery"]
    assert 3 == recovery["dropped_rows"]  # blob, obj and cur rows of the deleted blob
    assert (1, 100) == (recovery["entries"], recovery["bytes"])
    assert (1, 100) == _totals(cache_dir)


# -- verify -------------------------------------------------------------------------------------


def test_verify_intact_exits_0(tmp_path: Path, cache_dir: Path) -> None:
    """verify on an intact cache checks every blob and exits 0."""
    _populate(cache_dir, 3)
    result = run("verify", "--config", _config(tmp_path, cache_dir, 1000))
    assert 0 == result.exit_code, result.output
    assert result.stdout.startswith("checked 3 blobs (300 bytes) in ")
    assert result.stdout.rstrip().endswith(": 0 mismatched")
    assert "quarantined" not in result.stderr


def test_verify_corrupted_exits_1(tmp_path: Path, cache_dir: Path) -> None:
    """verify after corrupting a blob exits 1 and names the quarantined sha on stderr."""
    paths = _populate(cache_dir, 3)
    _corrupt(paths[1])
    result = run("verify", "--config", _config(tmp_path, cache_dir, 1000))
    assert 1 == result.exit_code, result.output
    assert f"quarantined {paths[1].name}: its bytes do not hash to its name" in result.stderr
    assert "1 mismatched" in result.stdout
    assert not paths[1].exists()
    assert [paths[1].name] == [p.name.split(".")[0] for p in (cache_dir / "quarantine").iterdir()]
    assert (2, 200) == _totals(cache_dir)


def test_verify_json(tmp_path: Path, cache_dir: Path) -> None:
    """verify --json reports checked and mismatched; a second run finds the cache clean."""
    paths = _populate(cache_dir, 3)
    _corrupt(paths[0])
    config = _config(tmp_path, cache_dir, 1000)
    result = run("verify", "--json", "--config", config)
    assert 1 == result.exit_code, result.output
    report = json.loads(result.stdout)
    assert 3 == report["checked"]
    assert [paths[0].name] == report["mismatched"]
    assert 2 == report["dropped_rows"]
    again = run("verify", "--json", "--config", config)
    assert 0 == again.exit_code, again.output
    assert (2, []) == (json.loads(again.stdout)["checked"], json.loads(again.stdout)["mismatched"])


# -- ownership of the cache ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gc", "verify"])
def test_offline_maintenance_refuses_a_cache_another_process_owns(
    tmp_path: Path, cache_dir: Path, command: str
) -> None:
    """Cache locked, no daemon answering: gc/verify exit 4 with one line, touching nothing."""
    paths = _populate(cache_dir, 3)
    owner = Store(cache_dir, lock=True)
    try:
        result = run(command, "--config", _config(tmp_path, cache_dir, 1))
    finally:
        owner.close()
    assert 4 == result.exit_code
    assert 1 == len(result.stderr.strip().splitlines())
    assert f"process {os.getpid()}" in result.stderr
    assert all(p.exists() for p in paths)


def test_offline_gc_keeps_a_live_downloads_temp_file(tmp_path: Path, cache_dir: Path) -> None:
    """gc's store open leaves another live process's temp file alone (issue 11, Why 4)."""
    _populate(cache_dir, 1)
    script = (
        "import sys; from assetd.store import Store\n"
        f"s = Store({str(cache_dir)!r})\n"
        "with s.staged() as st:\n"
        "    st.write(memoryview(b'half a download'))\n"
        "    print(st.path, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        staged = Path(proc.stdout.readline().strip())
        result = run("gc", "--config", _config(tmp_path, cache_dir, 10_000))
        assert 0 == result.exit_code, result.output
        assert staged.exists()
    finally:
        proc.communicate("", timeout=30)


def test_offline_gc_removes_a_dead_processes_temp_file(tmp_path: Path, cache_dir: Path) -> None:
    """A temp file whose process is gone is a crash leftover: the owner's open removes it."""
    _populate(cache_dir, 1)
    leftover = cache_dir / "tmp" / "blob-999999999-x.part"
    leftover.write_bytes(b"partial")
    result = run("gc", "--config", _config(tmp_path, cache_dir, 10_000))
    assert 0 == result.exit_code, result.output
    assert not leftover.exists()
