"""Staged blob files: positioned writes start writeback in whole 256 KiB steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from assetd.store import blobs

KIB = 1 << 10


@pytest.fixture
def writebacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (offset, length) of every writeback started, instead of starting it."""
    calls: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        calls.append((offset, length))
        return 0

    monkeypatch.setattr(blobs, "_sync_file_range", record)
    return calls


@pytest.fixture
def staged(tmp_path: Path) -> Iterator[blobs.StagedBlob]:
    blob = blobs.StagedBlob(tmp_path)
    try:
        yield blob
    finally:
        blob.discard()


def test_small_writes_start_writeback_once_they_complete_256_kib(
    staged: blobs.StagedBlob, writebacks: list[tuple[int, int]]
) -> None:
    """Two 128 KiB writes start writeback of the 256 KiB they complete, once; a tail waits."""
    staged.allocate(600 * KIB)
    for offset in range(0, 512 * KIB, 128 * KIB):
        staged.pwrite(memoryview(b"x" * 128 * KIB), offset)
    staged.pwrite(memoryview(b"y" * 88 * KIB), 512 * KIB)
    assert [(0, 256 * KIB), (256 * KIB, 256 * KIB)] == writebacks
    assert b"x" * 512 * KIB + b"y" * 88 * KIB == staged.path.read_bytes()


def test_a_large_write_starts_writeback_of_the_whole_steps_it_covers(
    staged: blobs.StagedBlob, writebacks: list[tuple[int, int]]
) -> None:
    """A 1 MiB write at an unaligned offset starts writeback from its step's start to its last."""
    staged.allocate(2048 * KIB)
    staged.pwrite(memoryview(b"z" * 1024 * KIB), 100 * KIB)
    assert [(0, 1024 * KIB)] == writebacks
