"""Unit tests for assetd.lockfile (`assetd lock`), against a scripted fake daemon."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from assetd.client import AssetdClient
from assetd.errors import AssetError
from assetd.lockfile import dumps_like, lock_setup
from tests.support.fakedaemon import FakeDaemon

SRC = "s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV"
PIN = "ab" * 32
NEWER = "cd" * 32


class Objects:
    """What the fake daemon answers: source -> (sha256, version_id), or an error code."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, str | None]] = {SRC: (PIN, None)}
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        found = self.objects.get(request["source"])
        if found is None:
            return {
                "ok": False,
                "error": {"code": "not_found", "message": "gone", "retryable": False},
            }
        digest, version = found
        if request.get("sha256") not in (None, digest):
            message = f"the object's content (sha256 {digest[:12]}...) is not the pinned content"
            error = {"code": "content_mismatch", "message": message, "retryable": False}
            return {"ok": False, "error": error}
        return {
            "source": request["source"],
            "path": "/cache/blobs/sha256/ab/" + digest,
            "size": 10,
            "sha256": digest,
            "etag": '"e"',
            "version_id": request.get("version_id") or version,
            "cache": "hit",
            "pinned_until": 0.0,
        }


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Objects, AssetdClient]]:
    objects = Objects()
    fake = FakeDaemon(str(tmp_path / "d.sock"), objects)
    fake.start()
    client = AssetdClient(str(tmp_path / "d.sock"), timeout=10)
    yield objects, client
    client.close()
    fake.stop()


SETUP = (
    "{\n"
    '  "assets": [\n'
    "    {\n"
    f'      "source": "{SRC}",\n'
    '      "target": "/tmp/RESTAURANTES.CSV",\n'
    '      "read_only": true\n'
    "    },\n"
    "    {\n"
    '      "source": "fixtures/expected.txt",\n'
    '      "target": "/grader/expected.txt"\n'
    "    }\n"
    "  ],\n"
    '  "run": "python3 /work/solution.py"\n'
    "}\n"
)


def test_lock_writes_sha256_after_source_keeping_the_rest(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """Only the sha256 line is added; local sources are skipped; nothing else moves."""
    _objects, client = daemon
    path = tmp_path / "setup.json"
    path.write_text(SETUP)
    report = lock_setup(path, client)
    assert SETUP.replace(f'"{SRC}",\n', f'"{SRC}",\n      "sha256": "{PIN}",\n') == (
        path.read_text()
    )
    assert (["locked", "skipped"], True) == ([e.status for e in report.entries], report.written)


def test_lock_versioned_writes_version_and_is_idempotent(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """A versioned object gets version_id then sha256; a second lock changes nothing."""
    objects, client = daemon
    objects.objects[SRC] = (PIN, "v7")
    path = tmp_path / "setup.json"
    path.write_text(SETUP)
    lock_setup(path, client)
    first = path.read_text()
    again = lock_setup(path, client)
    entry = json.loads(first)["assets"][0]
    assert ["source", "version_id", "sha256", "target", "read_only"] == list(entry)
    assert ("v7", PIN) == (entry["version_id"], entry["sha256"])
    assert (first, False) == (path.read_text(), again.written)
    assert ("v7", PIN) == (objects.requests[-1]["version_id"], objects.requests[-1]["sha256"])


def test_check_lists_drift_and_writes_nothing(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """--check: current, then drifted after an overwrite; the file never changes."""
    objects, client = daemon
    path = tmp_path / "setup.json"
    path.write_text(SETUP)
    unlocked = lock_setup(path, client, check=True)
    lock_setup(path, client)
    locked_text = path.read_text()
    current = lock_setup(path, client, check=True)
    objects.objects[SRC] = (NEWER, None)
    drifted = lock_setup(path, client, check=True)
    assert ["unlocked"] == [e.status for e in unlocked.problems]
    assert [] == current.problems
    assert [("drifted", PIN, NEWER)] == [
        (e.status, e.locked["sha256"], e.current["sha256"]) for e in drifted.problems
    ]
    assert None is objects.requests[-1].get("sha256")  # check asks for the current object
    assert locked_text == path.read_text()


def test_lock_keeps_pins_unless_upgrade(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """An existing pin is verified (content_mismatch: nothing written); --upgrade re-locks."""
    objects, client = daemon
    path = tmp_path / "setup.json"
    path.write_text(SETUP)
    lock_setup(path, client)
    locked_text = path.read_text()
    objects.objects[SRC] = (NEWER, None)
    kept = lock_setup(path, client)
    assert (["content_mismatch"], False) == (
        [e.error["code"] for e in kept.problems if e.error],
        kept.written,
    )
    assert locked_text == path.read_text()
    upgraded = lock_setup(path, client, upgrade=True)
    assert (True, NEWER) == (upgraded.written, json.loads(path.read_text())["assets"][0]["sha256"])


def test_alias_gets_sha256_but_no_version_id(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """asset:// entries take only a sha256: the version belongs to the catalog entry."""
    objects, client = daemon
    objects.objects["asset://tp2/data"] = (PIN, "v9")
    path = tmp_path / "setup.json"
    path.write_text(json.dumps({"assets": [{"source": "asset://tp2/data", "target": "/t"}]}))
    lock_setup(path, client)
    assert [{"source": "asset://tp2/data", "sha256": PIN, "target": "/t"}] == json.loads(
        path.read_text()
    )["assets"]


def test_invalid_setup_is_refused_before_any_request(
    daemon: tuple[Objects, AssetdClient], tmp_path: Path
) -> None:
    """A setup config with an invalid asset fails at once, naming the entry."""
    objects, client = daemon
    path = tmp_path / "setup.json"
    path.write_text(json.dumps({"assets": [{"source": SRC, "target": "relative"}]}))
    with pytest.raises(AssetError) as info:
        lock_setup(path, client)
    assert ("bad_request", []) == (info.value.code, objects.requests)
    assert info.value.message.startswith("assets[0]: ")


@given(
    data=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
        max_leaves=10,
    ),
    indent=st.sampled_from([None, 2, 4, "\t"]),
    newline=st.booleans(),
)
def test_dumps_like_reproduces_json_dumps_layouts(data: Any, indent: Any, newline: bool) -> None:
    """A file written by json.dumps (any indent, with or without final newline) round-trips."""
    original = json.dumps(data, indent=indent, ensure_ascii=False) + ("\n" if newline else "")
    if indent is not None and "\n" not in original.rstrip("\n"):
        return  # a scalar or empty container: no indented line to learn the indent from
    assert original == dumps_like(original, json.loads(original))


def test_lock_is_all_or_nothing(daemon: tuple[Objects, AssetdClient], tmp_path: Path) -> None:
    """One asset failing leaves the whole file untouched, the good asset unlocked too."""
    _objects, client = daemon
    path = tmp_path / "setup.json"
    text = json.dumps(
        {
            "assets": [
                {"source": SRC, "target": "/a"},
                {"source": "s3://autograder-assets/gone.csv", "target": "/b"},
            ]
        },
        indent=2,
    )
    path.write_text(text)
    report = lock_setup(path, client)
    assert (["locked", "error"], False) == ([e.status for e in report.entries], report.written)
    assert text == path.read_text()
