"""Commit order and atomic publish, with a crash injected between each pair of steps (issue 11).

A download is published in four steps: bytes written to a temp file, fsync,
rename into ``blobs/``, index row. A subprocess runs one real commit and
``os._exit``\\s right after one of the steps; the cache is then checked as a
restarted daemon would find it, before and after recovery. Unlike random
kills, every boundary is hit every run.

Invariants: no index row names a missing or wrong blob (the row is the
commit point), no file under ``blobs/`` has bytes that do not hash to its
name, the published file IS the staged file (a rename, never a copy), and
after recovery ``tmp/`` is empty and the object reads as a miss or as the
right bytes.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import diskcache
import pytest

from assetd.store import Store

DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()
STEPS = ["after_write", "after_fsync", "after_rename", "after_row", "none"]

# One commit in a fresh process; the crash hook for STEP is installed around
# the real code, which is not changed. Prints the staged file's inode first.
_SCRIPT = """
import contextlib, os, sys
from assetd.store import StagedBlob, Store

root, step = sys.argv[1], sys.argv[2]
data = bytes(range(256)) * 4096
sha = {sha!r}

def crash():
    os._exit(0)

seal, publish = StagedBlob.seal, Store._publish
if step == "after_write":
    StagedBlob.seal = lambda self: crash()
elif step == "after_fsync":
    def _seal(self):
        seal(self)
        crash()
    StagedBlob.seal = _seal
elif step == "after_rename":
    def _publish(staged, sha256, path, *, exists):
        publish(staged, sha256, path, exists=exists)
        crash()
    Store._publish = staticmethod(_publish)

store = Store(root, lock=True)
if step == "after_row":
    transact = store.index.transact
    @contextlib.contextmanager
    def _transact():
        with transact():
            yield
        crash()
    store.index.transact = _transact

with store.staged() as staged:
    half = len(data) // 2
    staged.write(memoryview(data)[:half])
    staged.write(memoryview(data)[half:])
    print(os.fstat(staged.fd).st_ino, flush=True)
    store.commit(staged, bucket="b", key="k", sha256=sha, size=len(data), etag='"e"',
                 version_id=None, requested_version=None, pinned_until=0.0)
store.close()
"""


def _crash_at(root: Path, step: str) -> int:
    """Run one commit that dies after ``step``; returns the staged file's inode."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(sha=SHA), str(root), step],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.split()[0])


def _rows(root: Path) -> dict[tuple[str, ...], object]:
    with diskcache.Cache(str(root / "index")) as index:
        return {k: index.get(k) for k in index.iterkeys()}


def _blobs(root: Path) -> list[Path]:
    return sorted((root / "blobs" / "sha256").glob("*/*"))


@pytest.mark.parametrize("step", STEPS)
def test_crash_between_steps_leaves_a_consistent_cache(tmp_path: Path, step: str) -> None:
    """Crash after each publish step: no row without its blob, no partial blob, rename only."""
    root = tmp_path / "cache"
    staged_inode = _crash_at(root, step)
    rows = _rows(root)
    blob = root / "blobs" / "sha256" / SHA[:2] / SHA
    obj_rows = {k: v for k, v in rows.items() if k[0] == "obj"}
    # the row is the commit point: a row means the right bytes are in place
    for k, value in obj_rows.items():
        assert isinstance(value, dict)
        assert (SHA, True) == (value["sha256"], ("blob", SHA) in rows), k
        assert SHA == hashlib.sha256(blob.read_bytes()).hexdigest()
    # nothing under blobs/ is ever partial
    assert [] == [
        p.name for p in _blobs(root) if hashlib.sha256(p.read_bytes()).hexdigest() != p.name
    ]
    # published by rename: the blob is the very file that was staged and fsynced
    if blob.exists():
        assert staged_inode == blob.stat().st_ino
    committed = step in ("after_row", "none")
    assert committed == bool(obj_rows)
    # a restarted owner recovers: tmp/ empty, the object a miss or the right bytes
    store = Store(root, lock=True)
    try:
        report = store.recover()
        hit = store.lookup("b", "k", None)
        assert [] == list((root / "tmp").iterdir())
        if committed:
            assert hit is not None
            assert DATA == hit.path.read_bytes()
        else:
            assert hit is None
            assert [] == _blobs(root)  # an unreferenced published blob is deleted
        print(json.dumps({"step": step, "recovery": report.to_dict()}))
    finally:
        store.close()
