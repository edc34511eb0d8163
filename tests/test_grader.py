"""Unit tests for assetd.grader: asset specs, pre-flight, placement, streamed tar, bytes provider.

House style puts the expected value on the left of ==. No S3 anywhere: ``s3://``
sources go to tests.support.fakedaemon.FakeDaemon on a Unix socket in tmp_path,
which answers with blob files written under tmp_path; local sources live under a
local root in tmp_path. The last section grades tp2 (examples/tp2/grade.py) in
bubblewrap against the same fake daemon.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from assetd.client import AssetdClient
from assetd.errors import AssetError, ConfigError, IntegrityError, NotFound, Unavailable
from assetd.grader import (
    AssetdBytesProvider,
    AssetSourceResolver,
    AssetSpec,
    LocalProvider,
    PlacedAsset,
    PreflightError,
    PreflightFailure,
    ResolvedAsset,
    bwrap_args,
    check_assets,
    docker_mounts,
    parse_assets,
    place_copies,
    tar_stream,
)
from tests.support.fakedaemon import FakeDaemon

ROOT = Path(__file__).resolve().parents[1]
TP2 = ROOT / "examples" / "tp2"
BUCKET = "autograder-assets"
SRC = f"s3://{BUCKET}/datasets/tp2/RESTAURANTES.CSV"
MISSING = f"s3://{BUCKET}/datasets/tp2/MISSING.CSV"
PINNED_UNTIL = 1764150000.0


def sha256(data: bytes) -> str:
    """Hex SHA-256 of data."""
    return hashlib.sha256(data).hexdigest()


def error_answer(code: str, message: str) -> dict[str, Any]:
    """A daemon failure answer, as DESIGN.md shows it."""
    return {"ok": False, "error": {"code": code, "message": message, "retryable": False}}


class Daemon:
    """A FakeDaemon that resolves sources to blob files it wrote; others answer not_found."""

    def __init__(self, socket_path: str, blob_dir: Path) -> None:
        self.blob_dir = blob_dir
        self.answers: dict[str, dict[str, Any]] = {}
        self.fake = FakeDaemon(socket_path, self._script)
        self.client = AssetdClient(socket_path, timeout=10)

    def _script(self, request: dict[str, Any]) -> dict[str, Any]:
        source = str(request.get("source"))
        return self.answers.get(
            source, error_answer("not_found", f"object {source} does not exist")
        )

    def put(self, source: str, data: bytes, cache: str = "miss") -> Path:
        """Write data as a 0444 content-addressed blob and answer source with its path."""
        digest = sha256(data)
        path = self.blob_dir / digest[:2] / digest
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
            path.chmod(0o444)
        self.answers[source] = {
            "source": source,
            "path": str(path),
            "size": len(data),
            "sha256": digest,
            "etag": '"' + hashlib.md5(data).hexdigest() + '"',  # noqa: S324 - an S3 ETag
            "version_id": None,
            "cache": cache,
            "pinned_until": PINNED_UNTIL,
        }
        return path

    def fail(self, source: str, code: str, message: str) -> None:
        """Answer source with an error."""
        self.answers[source] = error_answer(code, message)

    @property
    def resolves(self) -> list[dict[str, Any]]:
        """The resolve requests received so far."""
        return [r for r in self.fake.requests if r.get("op") == "resolve"]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A started fake daemon with a client connected to it."""
    sock = str(tmp_path / "d.sock")
    assert len(sock) < 100, sock
    d = Daemon(sock, tmp_path / "cache" / "blobs" / "sha256")
    d.fake.start()
    yield d
    d.client.close()
    d.fake.stop()


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    """A local root with fixtures/tp2/expected.txt, an outside file and links that escape."""
    root = tmp_path / "local"
    (root / "fixtures" / "tp2").mkdir(parents=True)
    (root / "fixtures" / "tp2" / "expected.txt").write_bytes(b"expected output\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not yours\n")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escape-dir").symlink_to(outside)
    (root / "inside-link.txt").symlink_to(root / "fixtures" / "tp2" / "expected.txt")
    return root


def entry(**fields: Any) -> dict[str, Any]:
    """A valid asset entry with some fields replaced."""
    return {"source": SRC, "target": "/tmp/RESTAURANTES.CSV", **fields}


# --- AssetSpec.from_dict / parse_assets ----------------------------------------------------

BAD_ENTRIES = [
    pytest.param(entry(target="tmp/x.csv"), "bad_request", "absolute", id="relative-target"),
    pytest.param(entry(target="/tmp/../etc/passwd"), "bad_request", "'..'", id="dotdot"),
    pytest.param(entry(target="/tmp/.."), "bad_request", "'..'", id="dotdot-last"),
    pytest.param(entry(target="/tmp//x.csv"), "bad_request", "normalised", id="double-slash"),
    pytest.param(entry(target="//tmp/x.csv"), "bad_request", "normalised", id="leading-2-slash"),
    pytest.param(entry(target="/tmp/./x.csv"), "bad_request", "normalised", id="dot-segment"),
    pytest.param(entry(target="/tmp/x/"), "bad_request", "normalised", id="trailing-slash"),
    pytest.param(entry(target="/"), "bad_request", "'/'", id="root"),
    pytest.param(entry(target="/proc"), "bad_request", "/proc", id="proc"),
    pytest.param(entry(target="/proc/self/environ"), "bad_request", "/proc", id="under-proc"),
    pytest.param(entry(target="/sys"), "bad_request", "/sys", id="sys"),
    pytest.param(entry(target="/sys/kernel/x"), "bad_request", "/sys", id="under-sys"),
    pytest.param(entry(target="/dev"), "bad_request", "/dev", id="dev"),
    pytest.param(entry(target="/dev/shm/x"), "bad_request", "/dev", id="under-dev"),
    pytest.param(entry(target="/tmp/x\n.csv"), "bad_request", "control", id="newline-target"),
    pytest.param(
        entry(target="/tmp/x\x7f.csv"),
        "bad_request",
        "control",
        id="del-target",
    ),
    pytest.param(entry(target=5), "bad_request", "target", id="target-not-str"),
    pytest.param({"source": SRC}, "bad_request", "target", id="target-missing"),
    pytest.param(entry(source=""), "malformed_uri", "source", id="empty-source"),
    pytest.param(entry(source="   "), "malformed_uri", "source", id="blank-source"),
    pytest.param(
        entry(source=42),
        "bad_request",
        "source",
        id="source-not-str",
    ),
    pytest.param(entry(mode="r"), "bad_request", "'mode'", id="unknown-field"),
    pytest.param(entry(read_only="yes"), "bad_request", "read_only", id="read-only-str"),
    pytest.param(entry(read_only=1), "bad_request", "read_only", id="read-only-int"),
    pytest.param(entry(read_only=None), "bad_request", "read_only", id="read-only-null"),
    pytest.param(entry(version_id=""), "bad_request", "version_id", id="version-empty"),
    pytest.param(entry(version_id=7), "bad_request", "version_id", id="version-not-str"),
    pytest.param(entry(source="s3://"), "malformed_uri", "bucket", id="s3-no-bucket"),
    pytest.param(entry(source=f"s3://{BUCKET}/"), "malformed_uri", "key", id="s3-no-key"),
    pytest.param(entry(source="s3://Bad_Bucket/k"), "malformed_uri", "bucket", id="bad-bucket"),
    pytest.param(entry(source="http://x/y"), "unsupported_scheme", "http", id="http"),
    pytest.param(entry(source=f"S3://{BUCKET}/k"), "unsupported_scheme", "S3", id="upper-S3"),
    pytest.param(entry(source="asset:tp2/x"), "malformed_uri", "asset://", id="asset-no-slashes"),
    pytest.param(entry(source="asset://TP2"), "malformed_uri", "asset name", id="asset-uppercase"),
    pytest.param(entry(sha256="AB" * 32), "bad_request", "sha256", id="sha256-uppercase"),
    pytest.param(entry(sha256="ab" * 31), "bad_request", "sha256", id="sha256-short"),
    pytest.param(entry(sha256=5), "bad_request", "sha256", id="sha256-not-str"),
    pytest.param(entry(source="/srv/x.csv"), "malformed_uri", "relative", id="local-absolute"),
    pytest.param(entry(source="../x.csv"), "malformed_uri", "'..'", id="local-dotdot"),
]


@pytest.mark.parametrize(("data", "code", "fragment"), BAD_ENTRIES)
def test_invalid_entry_is_refused_with_code(data: dict[str, Any], code: str, fragment: str) -> None:
    """from_dict and parse_assets refuse the entry with the expected code and a telling message."""
    with pytest.raises(AssetError) as direct:
        AssetSpec.from_dict(data)
    with pytest.raises(AssetError) as listed:
        parse_assets({"assets": [entry(target="/data/first.csv"), data]})
    assert code == direct.value.code
    assert fragment in direct.value.message
    assert (code, direct.value.message) == (listed.value.code, listed.value.message)


BAD_LISTS = [
    pytest.param(
        {"assets": [entry(), entry(source=f"s3://{BUCKET}/other.csv")]},
        "bad_request",
        "same target",
        id="duplicate-target",
    ),
    pytest.param(
        [entry(read_only=True), entry(read_only=False), entry(target="/x")],
        "bad_request",
        "same target",
        id="duplicate-target-bare-list",
    ),
    pytest.param({"assets": entry()}, "bad_request", "'assets'", id="assets-is-object"),
    pytest.param({"assets": SRC}, "bad_request", "'assets'", id="assets-is-string"),
    pytest.param({"assets": None}, "bad_request", "'assets'", id="assets-is-null"),
    pytest.param({"assets": [SRC]}, "bad_request", "object", id="entry-is-string"),
    pytest.param({"assets": [entry(), None]}, "bad_request", "object", id="entry-is-null"),
    pytest.param({"assets": [[SRC, "/tmp/x"]]}, "bad_request", "object", id="entry-is-list"),
]


@pytest.mark.parametrize(("config", "code", "fragment"), BAD_LISTS)
def test_invalid_assets_list_is_refused(config: Any, code: str, fragment: str) -> None:
    """parse_assets refuses a bad list, bad entries and duplicate targets with bad_request."""
    with pytest.raises(AssetError) as info:
        parse_assets(config)
    assert code == info.value.code
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(entry(), AssetSpec(SRC, "/tmp/RESTAURANTES.CSV", True, None), id="defaults"),
        pytest.param(
            entry(read_only=False, version_id="3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY"),
            AssetSpec(SRC, "/tmp/RESTAURANTES.CSV", False, "3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY"),
            id="writable-versioned",
        ),
        pytest.param(
            entry(version_id=None), AssetSpec(SRC, "/tmp/RESTAURANTES.CSV"), id="null-version"
        ),
        pytest.param(
            {"source": "fixtures/tp2/expected.txt", "target": "/grader/expected.txt"},
            AssetSpec("fixtures/tp2/expected.txt", "/grader/expected.txt", True, None),
            id="local-source",
        ),
        pytest.param(entry(target="/devices/x"), AssetSpec(SRC, "/devices/x"), id="devices"),
        pytest.param(entry(target="/system/x"), AssetSpec(SRC, "/system/x"), id="system"),
        pytest.param(entry(target="/processed/x"), AssetSpec(SRC, "/processed/x"), id="processed"),
        pytest.param(entry(target="/tmp/..x"), AssetSpec(SRC, "/tmp/..x"), id="dotdot-prefix"),
        pytest.param(
            entry(target="/datos/año 2024.csv"), AssetSpec(SRC, "/datos/año 2024.csv"), id="utf8"
        ),
    ],
)
def test_valid_entry_parses(data: dict[str, Any], expected: AssetSpec) -> None:
    """A valid entry gives the AssetSpec with defaults read_only True and version_id None."""
    assert expected == AssetSpec.from_dict(data)
    assert [expected] == parse_assets({"assets": [data]})


def test_parse_assets_keeps_order_and_accepts_bare_list_or_no_assets() -> None:
    """parse_assets keeps entry order, takes a bare list, and treats a missing list as empty."""
    entries = [entry(target="/b"), entry(target="/a", read_only=False)]
    expected = [AssetSpec(SRC, "/b", True), AssetSpec(SRC, "/a", False)]
    assert expected == parse_assets({"assets": entries, "run": "python3 x.py"})
    assert expected == parse_assets(entries)
    assert [] == parse_assets({"run": "python3 x.py"})
    assert [] == parse_assets({"assets": []})


def test_tp2_setup_json_parses() -> None:
    """examples/tp2/setup.json is a valid setup config with one read-only asset."""
    setup = json.loads((TP2 / "setup.json").read_text())
    assert [AssetSpec(SRC, "/tmp/RESTAURANTES.CSV", True, None)] == parse_assets(setup)


# --- LocalProvider -------------------------------------------------------------------------


def local_spec(source: str) -> AssetSpec:
    """A read-only spec for a local source."""
    return AssetSpec(source, "/grader/x")


def test_local_file_resolves_with_size(local_root: Path) -> None:
    """A regular file under the root resolves to its real path and size, no sha256 or cache."""
    spec = local_spec("fixtures/tp2/expected.txt")
    real = local_root / "fixtures" / "tp2" / "expected.txt"
    assert ResolvedAsset(spec, real, 16, None, None) == LocalProvider(local_root).resolve(spec)


def test_local_symlink_inside_root_resolves_to_target(local_root: Path) -> None:
    """A symlink that stays inside the root resolves to the file it points at."""
    spec = local_spec("inside-link.txt")
    asset = LocalProvider(local_root).resolve(spec)
    assert local_root / "fixtures" / "tp2" / "expected.txt" == asset.path


def test_local_root_given_through_a_symlink(local_root: Path, tmp_path: Path) -> None:
    """A root reached through a symlink still serves the files under it."""
    (tmp_path / "root-link").symlink_to(local_root)
    asset = LocalProvider(tmp_path / "root-link").resolve(local_spec("fixtures/tp2/expected.txt"))
    assert b"expected output\n" == asset.path.read_bytes()


@pytest.mark.parametrize(
    ("source", "code"),
    [
        pytest.param("escape.txt", "not_allowed", id="symlink-to-outside-file"),
        pytest.param("escape-dir/secret.txt", "not_allowed", id="symlinked-dir-outside"),
        # `..` never reaches the root check: parsing refuses it (docs/setup-config.md table)
        pytest.param("../outside/secret.txt", "malformed_uri", id="dotdot"),
        pytest.param("fixtures/../../outside/secret.txt", "malformed_uri", id="inner-dotdot"),
        pytest.param("fixtures/tp2/nope.txt", "not_found", id="missing"),
        pytest.param("fixtures/tp2", "not_found", id="directory"),
    ],
)
def test_local_source_refused(local_root: Path, source: str, code: str) -> None:
    """Escapes from the root are refused, missing files and directories are not_found."""
    with pytest.raises(AssetError) as info:
        LocalProvider(local_root).resolve(local_spec(source))
    assert code == info.value.code
    assert str(local_root) not in info.value.message  # no host paths in a student-facing text


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=8)


@given(prefix=SEGMENT, surrogate=SURROGATES, suffix=st.text(max_size=5))
def test_target_with_a_lone_surrogate_is_refused(prefix: str, surrogate: str, suffix: str) -> None:
    """Any target holding a lone surrogate is bad_request at validation, before argv or tar."""
    target = f"/tmp/{prefix}{surrogate}{suffix}"
    with pytest.raises(AssetError) as info:
        AssetSpec.from_dict(entry(target=target))
    assert "bad_request" == info.value.code


@given(version=st.text(min_size=1, max_size=5), surrogate=SURROGATES)
def test_version_id_with_a_lone_surrogate_is_refused(version: str, surrogate: str) -> None:
    """A version_id holding a lone surrogate is bad_request: it could not be sent."""
    with pytest.raises(AssetError) as info:
        AssetSpec.from_dict(entry(version_id=version + surrogate))
    assert "bad_request" == info.value.code


# st.text() drops surrogates from any alphabet: build the strings from lists instead
ANY_CHAR = st.one_of(st.characters(), SURROGATES, st.sampled_from("/.\n\x7f"))


@given(target=st.lists(ANY_CHAR, max_size=24).map(lambda cs: "/" + "".join(cs)))
def test_any_accepted_target_fits_argv_and_a_tar_header(target: str) -> None:
    """Whatever text a target holds, it is refused, or it encodes for argv and a PAX header."""
    try:
        spec = AssetSpec.from_dict(entry(target=target))
    except AssetError as exc:
        assert "bad_request" == exc.code
        return
    assert target.encode("utf-8") == os.fsencode(spec.target)
    info = tarfile.TarInfo(spec.target.lstrip("/"))
    assert info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")


# --- AssetSourceResolver.resolve_assets ----------------------------------------------------


def test_resolve_assets_all_good_in_order(daemon: Daemon, local_root: Path) -> None:
    """Every asset resolves, in order, with the daemon's path, size, sha256 and cache."""
    data_a, data_b = b"barrio,tipo\nPalermo,cafe\n", b"\x00\x01binary" * 100
    blob_a = daemon.put(SRC, data_a, cache="miss")
    blob_b = daemon.put(f"s3://{BUCKET}/datasets/b.bin", data_b, cache="hit")
    specs = parse_assets(
        [
            {"source": SRC, "target": "/tmp/R.CSV"},
            {"source": "fixtures/tp2/expected.txt", "target": "/grader/expected.txt"},
            {
                "source": f"s3://{BUCKET}/datasets/b.bin",
                "target": "/data/b.bin",
                "read_only": False,
            },
        ]
    )
    resolver = AssetSourceResolver(client=daemon.client, local_root=local_root)
    assert [
        ResolvedAsset(specs[0], blob_a, len(data_a), sha256(data_a), "miss"),
        ResolvedAsset(specs[1], local_root / "fixtures/tp2/expected.txt", 16, None, None),
        ResolvedAsset(specs[2], blob_b, len(data_b), sha256(data_b), "hit"),
    ] == resolver.resolve_assets(specs)


def test_resolve_assets_all_or_nothing_lists_every_failure(
    daemon: Daemon, local_root: Path
) -> None:
    """Two of three assets fail: PreflightError names both, with source, target, code, message."""
    daemon.put(SRC, b"id\n1\n")
    specs = parse_assets(
        [
            {"source": SRC, "target": "/tmp/R.CSV"},
            {"source": MISSING, "target": "/tmp/M.CSV"},
            {"source": "escape.txt", "target": "/grader/e.txt"},
        ]
    )
    resolver = AssetSourceResolver(client=daemon.client, local_root=local_root)
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(specs, job="tp2-4711")
    exc = info.value
    missing_msg = f"object {MISSING} does not exist"
    escape_msg = "local source resolves outside the local root"
    assert [
        PreflightFailure(MISSING, "/tmp/M.CSV", "not_found", missing_msg),
        PreflightFailure("escape.txt", "/grader/e.txt", "not_allowed", escape_msg),
    ] == exc.failures
    assert ["not_found", "not_allowed"] == exc.codes
    assert {
        "failures": [
            {
                "source": MISSING,
                "target": "/tmp/M.CSV",
                "code": "not_found",
                "message": missing_msg,
            },
            {
                "source": "escape.txt",
                "target": "/grader/e.txt",
                "code": "not_allowed",
                "message": escape_msg,
            },
        ]
    } == exc.to_dict()
    text = str(exc)
    for target, source, code, message in [
        ("/tmp/M.CSV", MISSING, "not_found", missing_msg),
        ("/grader/e.txt", "escape.txt", "not_allowed", escape_msg),
    ]:
        assert f"{target} <- {source}: {code}: {message}" in text.splitlines()
    assert "/tmp/R.CSV" not in text
    # the good asset and the failing one were both asked for: no stop at the first failure
    assert [SRC, MISSING] == [r["source"] for r in daemon.resolves]


def test_resolve_assets_s3_without_client_is_not_allowed(local_root: Path) -> None:
    """An s3 source on a resolver with no daemon client fails pre-flight with not_allowed."""
    resolver = AssetSourceResolver(local_root=local_root)
    specs = parse_assets([{"source": SRC, "target": "/tmp/R.CSV"}])
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(specs)
    assert [("/tmp/R.CSV", "not_allowed")] == [(f.target, f.code) for f in info.value.failures]


def test_resolve_assets_local_without_root_is_not_allowed(daemon: Daemon) -> None:
    """A local source on a resolver with no local_root fails with not_allowed, daemon untouched."""
    resolver = AssetSourceResolver(client=daemon.client)
    specs = parse_assets([{"source": "fixtures/tp2/expected.txt", "target": "/g/e.txt"}])
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(specs)
    assert ["not_allowed"] == info.value.codes
    assert [] == daemon.resolves


def test_resolve_assets_sends_job_version_and_timeout(daemon: Daemon) -> None:
    """The job label, the version_id and the resolver's timeout_s reach the daemon request."""
    daemon.put(SRC, b"x")
    resolver = AssetSourceResolver(client=daemon.client, timeout_s=30)
    specs = parse_assets([entry(version_id="v42")])
    resolver.resolve_assets(specs, job="tp2:reference.py")
    request = daemon.resolves[0]
    assert {
        "op": "resolve",
        "source": SRC,
        "version_id": "v42",
        "timeout_s": 30,
        "job": "tp2:reference.py",
    } == {k: v for k, v in request.items() if k != "id"}


def test_resolve_assets_daemon_down_is_a_preflight_failure(tmp_path: Path) -> None:
    """A daemon that cannot be reached is an 'unavailable' pre-flight failure, not a crash."""
    with AssetdClient(str(tmp_path / "nobody.sock"), timeout=2) as client:
        resolver = AssetSourceResolver(client=client)
        with pytest.raises(PreflightError) as info:
            resolver.resolve_assets(parse_assets([entry()]))
    assert ["unavailable"] == info.value.codes
    assert str(tmp_path) not in info.value.failures[0].message  # a verdict shows no host path


# --- placement -----------------------------------------------------------------------------


@pytest.fixture
def blobs(tmp_path: Path) -> tuple[ResolvedAsset, ResolvedAsset]:
    """A read-only and a writable asset, each backed by a 0444 blob."""
    out = []
    for name, data, target, read_only in [
        ("ro", b"read me\n", "/tmp/R.CSV", True),
        ("rw", b"CREATE TABLE notas(x);\n" * 10, "/home/student/notas.sqlite", False),
    ]:
        blob = tmp_path / "blobs" / name
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        blob.chmod(0o444)
        spec = AssetSpec(f"s3://{BUCKET}/{name}", target, read_only)
        out.append(ResolvedAsset(spec, blob, len(data)))
    return out[0], out[1]


def test_place_copies_keeps_read_only_and_copies_writable(
    blobs: tuple[ResolvedAsset, ResolvedAsset], tmp_path: Path
) -> None:
    """Read-only keeps the blob path; writable gets a 0644 copy in workdir; blobs untouched."""
    ro, rw = blobs
    workdir = tmp_path / "work"
    workdir.mkdir()
    before = {a.path: (a.path.read_bytes(), stat.S_IMODE(a.path.stat().st_mode)) for a in blobs}
    placed = place_copies(blobs, workdir)
    assert PlacedAsset(ro.path, "/tmp/R.CSV", False) == placed[0]
    copy = placed[1]
    assert ("/home/student/notas.sqlite", True) == (copy.target, copy.writable)
    assert workdir == copy.host_path.parent
    assert rw.path != copy.host_path
    assert rw.path.read_bytes() == copy.host_path.read_bytes()
    assert 0o644 == stat.S_IMODE(copy.host_path.stat().st_mode)
    with copy.host_path.open("ab") as f:
        f.write(b"student change")
    after = {a.path: (a.path.read_bytes(), stat.S_IMODE(a.path.stat().st_mode)) for a in blobs}
    assert before == after
    assert {0o444} == {mode for _, mode in after.values()}


def test_bwrap_args_in_order() -> None:
    """--ro-bind BLOB TARGET for read-only, --bind COPY TARGET for writable, in order."""
    placed = [
        PlacedAsset(Path("/cache/blobs/sha256/ab/ab12"), "/tmp/R.CSV", False),
        PlacedAsset(Path("/work/asset-x1"), "/home/student/n.sqlite", True),
        PlacedAsset(Path("/cache/blobs/sha256/cd/cd34"), "/data/b.bin", False),
    ]
    assert [
        "--ro-bind", "/cache/blobs/sha256/ab/ab12", "/tmp/R.CSV",
        "--bind", "/work/asset-x1", "/home/student/n.sqlite",
        "--ro-bind", "/cache/blobs/sha256/cd/cd34", "/data/b.bin",
    ] == bwrap_args(placed)  # fmt: skip
    assert [] == bwrap_args([])


def test_docker_mounts_exact_dicts() -> None:
    """docker_mounts gives Engine API HostConfig.Mounts entries, ReadOnly unless writable."""
    placed = [
        PlacedAsset(Path("/cache/blobs/sha256/ab/ab12"), "/tmp/R.CSV", False),
        PlacedAsset(Path("/work/asset-x1"), "/home/student/n.sqlite", True),
    ]
    assert [
        {"Type": "bind", "Source": "/cache/blobs/sha256/ab/ab12", "Target": "/tmp/R.CSV",
         "ReadOnly": True},
        {"Type": "bind", "Source": "/work/asset-x1", "Target": "/home/student/n.sqlite",
         "ReadOnly": False},
    ] == docker_mounts(placed)  # fmt: skip


def test_docker_mounts_match_docker_sdk_mount() -> None:
    """docker.types.Mount(target, source, type='bind', read_only) builds the same dict."""
    types = pytest.importorskip("docker.types")
    p = PlacedAsset(Path("/cache/blobs/sha256/ab/ab12"), "/tmp/R.CSV", False)
    mount = types.Mount(target=p.target, source=str(p.host_path), type="bind", read_only=True)
    assert [dict(mount)] == docker_mounts([p])


# --- tar_stream ----------------------------------------------------------------------------


def make_asset(
    tmp_path: Path, name: str, data: bytes, target: str, read_only: bool = True
) -> ResolvedAsset:
    """A ResolvedAsset backed by a 0444 file holding data."""
    path = tmp_path / "tarblobs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o444)
    return ResolvedAsset(AssetSpec(f"s3://{BUCKET}/{name}", target, read_only), path, len(data))


@pytest.fixture
def tar_assets(tmp_path: Path) -> list[ResolvedAsset]:
    """Assets of awkward sizes and names: small, empty, exactly one block, long UTF-8 path."""
    return [
        make_asset(tmp_path, "a", b"barrio,tipo\nPalermo,cafe\n", "/tmp/RESTAURANTES.CSV"),
        make_asset(tmp_path, "b", b"", "/home/student/empty.db", read_only=False),
        make_asset(tmp_path, "c", os.urandom(512), "/data/block.bin"),
        make_asset(tmp_path, "d", b"x" * 1000, "/data/" + "d" * 120 + "/año.csv", False),
    ]


def test_tar_stream_extracts_with_tarfile(tar_assets: list[ResolvedAsset]) -> None:
    """Members sit at the targets without '/', mode 0444 or 0644, with the assets' bytes."""
    archive = b"".join(tar_stream(tar_assets))
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        members = tar.getmembers()
        got = [
            (m.name, m.isreg(), m.mode, tar.extractfile(m).read())  # type: ignore[union-attr]
            for m in members
        ]
    assert [
        (a.spec.target[1:], True, 0o444 if a.spec.read_only else 0o644, a.path.read_bytes())
        for a in tar_assets
    ] == got


def test_tar_stream_streams_in_bounded_chunks(tmp_path: Path) -> None:
    """A 5 MiB asset at chunk_size 64 KiB comes in 80 data chunks, none over 64 KiB."""
    data = os.urandom(5 << 20)
    asset = make_asset(tmp_path, "big", data, "/data/big.bin")
    stream = tar_stream([asset], chunk_size=64 << 10)
    first, second = next(stream), next(stream)  # lazily: a header, then one data chunk
    rest = list(stream)
    chunks = [first, second, *rest]
    assert (512, 64 << 10) == (len(first), len(second))
    assert (64 << 10) >= max(len(c) for c in chunks)
    assert 80 == sum(1 for c in chunks if len(c) == 64 << 10)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        assert data == tar.extractfile("data/big.bin").read()  # type: ignore[union-attr]


def test_tar_stream_ends_with_end_of_archive_blocks(tar_assets: list[ResolvedAsset]) -> None:
    """The archive is whole 512-byte blocks and ends with two zero blocks."""
    chunks = list(tar_stream(tar_assets))
    archive = b"".join(chunks)
    assert 0 == len(archive) % 512
    assert b"\0" * 1024 == chunks[-1]
    assert b"\0" * 1024 == archive[-1024:]


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_tar_stream_piped_to_tar_extracts(tar_assets: list[ResolvedAsset], tmp_path: Path) -> None:
    """`tar -x -C DIR` reading the stream on stdin extracts every asset, without a warning."""
    out = tmp_path / "root"
    out.mkdir()
    proc = subprocess.Popen(
        ["tar", "-x", "-C", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    for chunk in tar_stream(tar_assets, chunk_size=4096):
        proc.stdin.write(chunk)
    stdout, stderr = proc.communicate()
    assert (0, b"", b"") == (proc.returncode, stdout, stderr)
    for a in tar_assets:
        extracted = out / a.spec.target.lstrip("/")
        assert a.path.read_bytes() == extracted.read_bytes()
        mode = 0o444 if a.spec.read_only else 0o644
        assert mode == stat.S_IMODE(extracted.stat().st_mode)


def test_tar_stream_of_nothing_is_an_empty_archive() -> None:
    """No assets: just the end-of-archive marker, which tarfile reads as an empty archive."""
    archive = b"".join(tar_stream([]))
    assert b"\0" * 1024 == archive
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        assert [] == tar.getmembers()


# --- AssetdBytesProvider -------------------------------------------------------------------


def test_bytes_provider_returns_the_blob_bytes(daemon: Daemon) -> None:
    """get_asset returns exactly the bytes of the file the daemon's answer points at."""
    data = os.urandom(300_000)
    daemon.put(SRC, data)
    provider = AssetdBytesProvider(daemon.client)
    assert data == provider.get_asset(SRC, "/tmp/RESTAURANTES.CSV", True)
    assert provider.last_error is None
    assert [SRC] == [r["source"] for r in daemon.resolves]


def test_bytes_provider_writable_returns_bytes_too(daemon: Daemon) -> None:
    """read_only False changes nothing for bytes: the caller writes its own copy."""
    daemon.put(SRC, b"abc")
    assert b"abc" == AssetdBytesProvider(daemon.client).get_asset(SRC, "/tmp/x", False)


def test_bytes_provider_daemon_error_is_none_with_last_error(daemon: Daemon) -> None:
    """A daemon error answer gives None; last_error keeps its code and message."""
    daemon.fail(MISSING, "access_denied", "access to the object was denied")
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset(MISSING, "/tmp/M.CSV") is None
    assert provider.last_error is not None
    assert ("access_denied", "access to the object was denied") == (
        provider.last_error.code,
        provider.last_error.message,
    )


def test_bytes_provider_last_error_resets_on_success(daemon: Daemon) -> None:
    """After a failure, a successful call clears last_error."""
    daemon.put(SRC, b"ok")
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset(MISSING, "/tmp/M.CSV") is None
    assert "not_found" == (provider.last_error.code if provider.last_error else None)
    assert b"ok" == provider.get_asset(SRC, "/tmp/R.CSV")
    assert provider.last_error is None


@pytest.mark.parametrize("target", ["tmp/x.csv", "/proc/x", "/tmp/../x", "/"])
def test_bytes_provider_invalid_target_is_bad_request(daemon: Daemon, target: str) -> None:
    """An invalid target gives None with bad_request, and nothing is asked of the daemon."""
    daemon.put(SRC, b"x")
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset(SRC, target) is None
    assert "bad_request" == (provider.last_error.code if provider.last_error else None)
    assert [] == daemon.resolves


def test_bytes_provider_local_source(daemon: Daemon, local_root: Path) -> None:
    """A local source under local_root returns its bytes without asking the daemon."""
    provider = AssetdBytesProvider(daemon.client, local_root=local_root)
    assert b"expected output\n" == provider.get_asset("fixtures/tp2/expected.txt", "/g/e.txt")
    assert provider.get_asset("escape.txt", "/g/x") is None
    assert "not_allowed" == (provider.last_error.code if provider.last_error else None)
    assert [] == daemon.resolves


def test_bytes_provider_over_max_bytes_is_none(daemon: Daemon) -> None:
    """An asset larger than max_bytes gives None and sets last_error; max_bytes itself is fine."""
    daemon.put(SRC, b"x" * 1001)
    daemon.put(f"s3://{BUCKET}/k1000", b"y" * 1000)
    provider = AssetdBytesProvider(daemon.client, max_bytes=1000)
    assert b"y" * 1000 == provider.get_asset(f"s3://{BUCKET}/k1000", "/tmp/k")
    assert provider.get_asset(SRC, "/tmp/R.CSV") is None
    assert provider.last_error is not None
    assert "mount it instead" in provider.last_error.message


def test_bytes_provider_over_max_bytes_code_is_too_large(daemon: Daemon) -> None:
    """An asset over max_bytes reports too_large, the code that means too big."""
    daemon.put(SRC, b"x" * 1001)
    provider = AssetdBytesProvider(daemon.client, max_bytes=1000)
    assert provider.get_asset(SRC, "/tmp/R.CSV") is None
    assert "too_large" == (provider.last_error.code if provider.last_error else None)


def test_bytes_provider_daemon_down_is_unavailable(tmp_path: Path) -> None:
    """With no daemon listening, get_asset returns None with the retryable code unavailable."""
    with AssetdClient(str(tmp_path / "nobody.sock"), timeout=2) as client:
        provider = AssetdBytesProvider(client)
        assert provider.get_asset(SRC, "/tmp/R.CSV") is None
    assert provider.last_error is not None
    assert ("unavailable", True) == (provider.last_error.code, provider.last_error.retryable)


def test_bytes_provider_raise_errors_raises_the_coded_runtime_error(daemon: Daemon) -> None:
    """raise_errors=True raises the daemon's error class, a RuntimeError naming target and code."""
    daemon.fail(MISSING, "not_found", f"object {MISSING} does not exist")
    provider = AssetdBytesProvider(daemon.client, raise_errors=True)
    with pytest.raises(RuntimeError) as info:
        provider.get_asset(MISSING, "/tmp/M.CSV")
    exc = info.value
    assert isinstance(exc, NotFound)
    assert ("not_found", False) == (exc.code, exc.retryable)
    assert f"/tmp/M.CSV: not_found: object {MISSING} does not exist" == str(exc)
    assert f"object {MISSING} does not exist" == exc.message


def test_bytes_provider_raise_errors_daemon_down_is_retryable(tmp_path: Path) -> None:
    """With no daemon, raise_errors gives unavailable, retryable, not a bare RuntimeError."""
    sock = str(tmp_path / "nobody.sock")
    with (
        AssetdBytesProvider(socket_path=sock, raise_errors=True) as p,
        pytest.raises(Unavailable) as info,
    ):
        p.get_asset(SRC, "/tmp/R.CSV")
    assert ("unavailable", True) == (info.value.code, info.value.retryable)


@pytest.mark.parametrize("raise_errors", [False, True])
def test_bytes_provider_zero_byte_asset_is_empty_bytes(daemon: Daemon, raise_errors: bool) -> None:
    """A zero-byte asset comes back as b"" (not None), in both modes."""
    daemon.put(SRC, b"")
    provider = AssetdBytesProvider(daemon.client, raise_errors=raise_errors)
    assert (b"", None) == (provider.get_asset(SRC, "/tmp/empty.csv"), provider.last_error)


def test_bytes_provider_sends_version_id_and_job(daemon: Daemon) -> None:
    """version_id= and job= travel with the resolve request."""
    daemon.put(SRC, b"v")
    provider = AssetdBytesProvider(daemon.client)
    assert b"v" == provider.get_asset(SRC, "/tmp/x", True, version_id="3HL4kqtJ", job="tp2:41")
    assert [("3HL4kqtJ", "tp2:41")] == [(r["version_id"], r["job"]) for r in daemon.resolves]


def test_bytes_provider_version_id_and_job_are_keyword_only(daemon: Daemon) -> None:
    """A fourth positional argument is refused, so old call sites cannot shift meaning."""
    provider = AssetdBytesProvider(daemon.client)
    with pytest.raises(TypeError):
        provider.get_asset(SRC, "/tmp/x", True, "3HL4kqtJ")  # type: ignore[misc]


def test_bytes_provider_last_error_belongs_to_the_calling_thread(daemon: Daemon) -> None:
    """A failure in one thread never shows up as another thread's last_error."""
    daemon.put(SRC, b"ok")
    provider = AssetdBytesProvider(daemon.client)
    failed = threading.Event()
    seen: dict[str, Any] = {}

    def failing() -> None:
        seen["fail"] = provider.get_asset(MISSING, "/tmp/M.CSV")
        seen["fail_error"] = provider.last_error
        failed.set()

    def succeeding() -> None:
        seen["ok"] = provider.get_asset(SRC, "/tmp/R.CSV")
        assert failed.wait(5)  # the other thread has failed in between
        seen["ok_error"] = provider.last_error

    threads = [threading.Thread(target=succeeding), threading.Thread(target=failing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert (b"ok", None, None) == (seen["ok"], seen["ok_error"], seen["fail"])
    assert "not_found" == seen["fail_error"].code
    assert provider.last_error is None  # this thread never called


def test_bytes_provider_shared_between_threads(daemon: Daemon) -> None:
    """One provider, its own connections, 8 threads x 25 calls: every thread gets its own bytes."""
    sources = {f"s3://{BUCKET}/t/{n}": os.urandom(1000 + n) for n in range(8)}
    for source, data in sources.items():
        daemon.put(source, data)
    socket_path = daemon.fake.path
    wrong: list[str] = []
    with AssetdBytesProvider(socket_path=socket_path) as provider:
        start = threading.Barrier(8)

        def work(source: str) -> None:
            start.wait(5)
            for _ in range(25):
                if provider.get_asset(source, "/tmp/t") != sources[source]:
                    wrong.append(source)

        threads = [threading.Thread(target=work, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert ([], 200) == (wrong, len(daemon.resolves))
    assert 1 <= daemon.fake.connections <= 8


def _socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_bytes_provider_close_releases_its_sockets(daemon: Daemon) -> None:
    """50 providers used then closed leave no socket open behind them."""
    daemon.put(SRC, b"x")
    baseline = _socket_fds()
    for _ in range(50):
        with AssetdBytesProvider(socket_path=daemon.fake.path) as provider:
            assert b"x" == provider.get_asset(SRC, "/tmp/x")
    deadline = time.monotonic() + 5  # the fake daemon's side closes once it reads EOF
    while _socket_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.02)
    assert baseline == _socket_fds()


def test_bytes_provider_does_not_close_a_client_it_was_given(daemon: Daemon) -> None:
    """close() leaves a caller's client alone: it is the caller's to close."""
    daemon.put(SRC, b"x")
    AssetdBytesProvider(daemon.client).close()
    assert b"x" == AssetdBytesProvider(daemon.client).get_asset(SRC, "/tmp/x")
    assert 1 == daemon.fake.connections


def test_bytes_provider_legacy_bucket_maps_bare_keys(daemon: Daemon) -> None:
    """With legacy_bucket, a bare key is asked for as s3://<bucket>/<key>."""
    daemon.put(SRC, b"legacy")
    provider = AssetdBytesProvider(daemon.client, legacy_bucket=BUCKET)
    assert b"legacy" == provider.get_asset("datasets/tp2/RESTAURANTES.CSV", "/tmp/R.CSV")
    assert [SRC] == [r["source"] for r in daemon.resolves]


def test_bare_key_without_legacy_bucket_names_the_fix(daemon: Daemon) -> None:
    """Without legacy_bucket or local_root, a bare key fails with a message naming the fix."""
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset("datasets/x.csv", "/tmp/x.csv") is None
    err = provider.last_error
    assert err is not None
    assert "not_allowed" == err.code
    assert "s3://<bucket>/datasets/x.csv" in err.message
    assert "legacy_bucket" in err.message
    assert [] == daemon.resolves


def test_resolver_legacy_bucket_keeps_the_spec_as_written(daemon: Daemon) -> None:
    """resolve_assets with legacy_bucket returns the spec as the setup config wrote it."""
    daemon.put(SRC, b"legacy")
    resolver = AssetSourceResolver(client=daemon.client, legacy_bucket=BUCKET)
    spec = AssetSpec("datasets/tp2/RESTAURANTES.CSV", "/tmp/R.CSV")
    [asset] = resolver.resolve_assets([spec])
    assert (spec, b"legacy") == (asset.spec, asset.path.read_bytes())


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"legacy_bucket": BUCKET, "local_root": "/srv"}, id="both"),
        pytest.param({"legacy_bucket": "Bad_Bucket"}, id="bad-bucket"),
    ],
)
def test_legacy_bucket_misconfigured_is_a_config_error(kwargs: dict[str, Any]) -> None:
    """legacy_bucket with local_root, or an invalid bucket name, fails at construction."""
    with pytest.raises(ConfigError):
        AssetSourceResolver(**kwargs)


def test_bytes_provider_blob_gone_is_retryable_unavailable(daemon: Daemon) -> None:
    """A blob removed between resolve and read is unavailable (retryable), no host path."""
    blob = daemon.put(SRC, b"soon gone")
    blob.unlink()
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset(SRC, "/tmp/R.CSV") is None
    err = provider.last_error
    assert err is not None
    assert ("unavailable", True) == (err.code, err.retryable)
    assert str(blob) not in err.message


def test_bytes_provider_blob_changed_is_retryable_integrity(daemon: Daemon) -> None:
    """A blob whose bytes differ from the resolved sha256 is integrity (retryable)."""
    blob = daemon.put(SRC, b"original")
    blob.chmod(0o644)
    blob.write_bytes(b"tampered")  # same size, other content
    provider = AssetdBytesProvider(daemon.client)
    assert provider.get_asset(SRC, "/tmp/R.CSV") is None
    err = provider.last_error
    assert ("integrity", True) == ((err.code, err.retryable) if err else None)


def test_check_assets_missing_changed_and_fine(tmp_path: Path) -> None:
    """check_assets: gone is unavailable, other size or content is integrity, intact is fine."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"12345")
    spec = AssetSpec(SRC, "/tmp/R.CSV")
    check_assets([ResolvedAsset(spec, blob, 5, sha256(b"12345"))], verify_sha256=True)
    with pytest.raises(IntegrityError):
        check_assets([ResolvedAsset(spec, blob, 6)])
    with pytest.raises(IntegrityError):
        check_assets([ResolvedAsset(spec, blob, 5, sha256(b"54321"))], verify_sha256=True)
    blob.unlink()
    with pytest.raises(Unavailable) as info:
        check_assets([ResolvedAsset(spec, blob, 5)])
    assert (True, False) == (info.value.retryable, str(blob) in info.value.message)


def test_place_copies_of_a_vanished_blob_is_retryable(tmp_path: Path) -> None:
    """A writable asset whose blob vanished before the copy raises unavailable."""
    spec = AssetSpec(SRC, "/tmp/w.csv", read_only=False)
    with pytest.raises(Unavailable):
        place_copies([ResolvedAsset(spec, tmp_path / "gone", 3)], tmp_path)


# --- examples/tp2/grade.py in bubblewrap, against the fake daemon ---------------------------

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")
EXPLOIT = """
import ctypes
# MS_REMOUNT | MS_BIND without MS_RDONLY: make the read-only bind mount writable again
ctypes.CDLL(None).mount(None, b"/tmp/RESTAURANTES.CSV", None, 32 | 4096, None)
with open("/tmp/RESTAURANTES.CSV", "w") as f:
    f.write("id,nombre,barrio,tipo,precio_medio,puntuacion,resenas,telefono\\n"
            "1,X,Almagro,parrilla,1000,5.0,100,0\\n")
print("Almagro: 1 restaurantes, puntuacion 5.00, precio 1000")
print("top: X (Almagro) 5.0 $1000")
"""


def load_example(name: str) -> ModuleType:
    """Import examples/tp2/<name>.py under a private module name."""
    spec = importlib.util.spec_from_file_location(f"tp2_{name}", TP2 / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tp2() -> tuple[ModuleType, ModuleType]:
    """examples/tp2's grade and dataset modules."""
    return load_example("grade"), load_example("dataset")


@pytest.fixture
def tp2_daemon(daemon: Daemon, tp2: tuple[ModuleType, ModuleType]) -> tuple[Daemon, Path]:
    """The fake daemon answering tp2's source with a small generated RESTAURANTES.CSV."""
    return daemon, daemon.put(SRC, tp2[1].generate(rows=3000))


def grade_one(
    tp2: tuple[ModuleType, ModuleType], daemon: Daemon, solution: Path, setup: Any = None
) -> Any:
    """tp2's grade() for one solution, its resolver on the fake daemon."""
    setup = setup or json.loads((TP2 / "setup.json").read_text())
    return tp2[0].grade(solution, setup, AssetSourceResolver(client=daemon.client))


@needs_bwrap
def test_tp2_reference_passes_and_wrong_fails(
    tp2: tuple[ModuleType, ModuleType], tp2_daemon: tuple[Daemon, Path]
) -> None:
    """tp2 in bubblewrap: the reference passes, wrong.py fails on a line, both with job labels."""
    daemon, _ = tp2_daemon
    reference = grade_one(tp2, daemon, TP2 / "solutions" / "reference.py")
    wrong = grade_one(tp2, daemon, TP2 / "solutions" / "wrong.py")
    assert ("pass", "output matches", ["miss"]) == (
        reference.status,
        reference.detail,
        reference.cache,
    )
    assert ("fail", "line 6 differs") == (wrong.status, wrong.detail)  # row 1 is Colegiales
    assert ["tp2:reference.py", "tp2:wrong.py"] == [r["job"] for r in daemon.resolves]


@needs_bwrap
def test_tp2_endless_student_gets_a_verdict(
    tp2: tuple[ModuleType, ModuleType],
    tp2_daemon: tuple[Daemon, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A solution that never ends gets a fail or error verdict when RUN_TIMEOUT_S passes."""
    monkeypatch.setattr(tp2[0], "RUN_TIMEOUT_S", 1)
    solution = tmp_path / "loop.py"
    solution.write_text("while True:\n    pass\n")
    verdict = grade_one(tp2, tp2_daemon[0], solution)
    assert verdict.status in {"fail", "error"}


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="bwrap keeps capabilities only when run as root")
def test_tp2_student_cannot_rewrite_the_cache_blob(
    tp2: tuple[ModuleType, ModuleType], tp2_daemon: tuple[Daemon, Path], tmp_path: Path
) -> None:
    """A student that remounts its read-only asset cannot change the blob nor pass with it."""
    daemon, blob = tp2_daemon
    original = blob.read_bytes()
    solution = tmp_path / "exploit.py"
    solution.write_text(EXPLOIT)
    verdict = grade_one(tp2, daemon, solution)
    assert sha256(original) == sha256(blob.read_bytes())
    assert "pass" != verdict.status


def test_tp2_invalid_setup_config_is_an_error_verdict(
    tp2: tuple[ModuleType, ModuleType], tp2_daemon: tuple[Daemon, Path]
) -> None:
    """A setup config with a forbidden target gives an error verdict, not a traceback."""
    setup = {"assets": [{"source": SRC, "target": "/proc/x"}]}
    verdict = grade_one(tp2, tp2_daemon[0], TP2 / "solutions" / "reference.py", setup)
    assert ("error", True) == (verdict.status, verdict.detail.startswith("invalid setup config"))


@needs_bwrap
def test_tp2_blob_gone_before_the_sandbox_is_an_infra_verdict(
    tp2: tuple[ModuleType, ModuleType],
    tp2_daemon: tuple[Daemon, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blob deleted between resolve and the bwrap run is an infra verdict, with no host path."""
    daemon, blob = tp2_daemon
    build = tp2[0].sandbox_argv

    def build_then_delete(*args: Any, **kwargs: Any) -> list[str]:
        argv: list[str] = build(*args, **kwargs)
        blob.unlink()  # gc, eviction or an operator, after every check and before bwrap
        return argv

    monkeypatch.setattr(tp2[0], "sandbox_argv", build_then_delete)
    verdict = grade_one(tp2, daemon, TP2 / "solutions" / "reference.py")
    printed = verdict.line() + json.dumps(verdict.__dict__)
    assert ("infra", "INFRA") == (verdict.status, verdict.line()[:5])
    assert "unavailable" in verdict.detail and "/tmp/RESTAURANTES.CSV" in verdict.detail
    assert (False, False) == (str(blob) in printed, str(blob.parents[3]) in printed)


def test_tp2_blob_changed_before_placement_is_an_infra_verdict(
    tp2: tuple[ModuleType, ModuleType],
    tp2_daemon: tuple[Daemon, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blob of another size after resolve is integrity, an infra verdict; nothing runs."""
    daemon, blob = tp2_daemon
    resolve = tp2[0].preflight
    ran: list[object] = []

    def resolve_then_truncate(*args: Any, **kwargs: Any) -> Any:
        assets = resolve(*args, **kwargs)
        blob.chmod(0o644)
        with blob.open("r+b") as f:
            f.truncate(10)
        return assets

    monkeypatch.setattr(tp2[0], "preflight", resolve_then_truncate)
    monkeypatch.setattr(tp2[0], "run_student", lambda *a, **k: ran.append(a))
    verdict = grade_one(tp2, daemon, TP2 / "solutions" / "reference.py")
    assert ("infra", [], True) == (verdict.status, ran, "integrity" in verdict.detail)
    assert str(blob) not in verdict.line() + json.dumps(verdict.__dict__)


def test_tp2_daemon_down_is_an_infra_verdict_without_the_socket_path(
    tp2: tuple[ModuleType, ModuleType], tmp_path: Path
) -> None:
    """No daemon: pre-flight fails with unavailable, printed as infra without the socket path."""
    sock = str(tmp_path / "nobody.sock")
    with AssetdClient(sock, timeout=2) as client:
        verdict = tp2[0].grade(
            TP2 / "solutions" / "reference.py",
            json.loads((TP2 / "setup.json").read_text()),
            AssetSourceResolver(client=client),
        )
    assert ("infra", "/tmp/RESTAURANTES.CSV: unavailable") == (
        verdict.status,
        verdict.detail.split("retry later: ")[1],
    )
    assert sock not in verdict.line() + json.dumps(verdict.__dict__)


@needs_bwrap
def test_tp2_student_cannot_fake_an_infra_verdict(
    tp2: tuple[ModuleType, ModuleType], tp2_daemon: tuple[Daemon, Path], tmp_path: Path
) -> None:
    """A student printing bwrap's mount error and exiting 1 is graded fail, not infra."""
    solution = tmp_path / "fake.py"
    solution.write_text(
        "import sys\n"
        'sys.stderr.write("bwrap: Can\'t find source path /x: No such file or directory\\n")\n'
        "sys.exit(1)\n"
    )
    verdict = grade_one(tp2, tp2_daemon[0], solution)
    assert ("fail", True) == (verdict.status, verdict.detail.startswith("exit 1: bwrap:"))


def test_bytes_provider_os_error_is_none_not_a_traceback(
    local_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError on the grader's side (a local file it may not read) is None with unavailable."""

    def denied(*args: Any, **kwargs: Any) -> ResolvedAsset:
        raise PermissionError(13, "Permission denied", str(local_root / "x"))

    monkeypatch.setattr(LocalProvider, "resolve", denied)
    provider = AssetdBytesProvider(AssetdClient("/nonexistent.sock"), local_root=local_root)
    assert provider.get_asset("fixtures/tp2/expected.txt", "/g/e.txt") is None
    err = provider.last_error
    assert ("unavailable", False) == (err.code if err else None, str(local_root) in str(err))


# --- content pins, asset:// and the manifest ---------------------------------------------


def test_spec_sha256_is_sent_and_checked(daemon: Daemon) -> None:
    """A pinned spec sends sha256; other bytes in an (old) daemon answer are content_mismatch."""
    daemon.put(SRC, b"new bytes\n")
    pin = sha256(b"old bytes\n")
    resolver = AssetSourceResolver(client=daemon.client)
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(parse_assets([entry(sha256=pin)]))
    assert ["content_mismatch"] == info.value.codes
    assert pin == daemon.resolves[0]["sha256"]


def test_asset_alias_goes_to_the_daemon(daemon: Daemon) -> None:
    """asset:// specs are resolved by the daemon; resolved_source reaches the manifest."""
    daemon.put("asset://tp2/data", b"x,y\n")
    daemon.answers["asset://tp2/data"]["resolved_source"] = SRC
    resolver = AssetSourceResolver(client=daemon.client)
    assets = resolver.resolve_assets(parse_assets([entry(source="asset://tp2/data")]))
    assert SRC == assets[0].resolved_source
    assert SRC == assets.manifest.assets[0].resolved_source
    assert "asset://tp2/data" == assets.manifest.assets[0].source


def test_local_pin_checked_by_the_grader(local_root: Path) -> None:
    """A pinned local source is hashed: the right pin resolves, a wrong one is content_mismatch."""
    good = sha256(b"expected output\n")
    resolver = AssetSourceResolver(local_root=local_root)
    spec = {"source": "fixtures/tp2/expected.txt", "target": "/g/e.txt"}
    assert good == resolver.resolve_assets(parse_assets([{**spec, "sha256": good}]))[0].sha256
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(parse_assets([{**spec, "sha256": "0" * 64}]))
    assert ["content_mismatch"] == info.value.codes


def test_manifest_of_a_good_job(daemon: Daemon, local_root: Path) -> None:
    """resolve_assets' manifest: every asset, every field, in the setup config's order."""
    data = b"barrio,tipo\nPalermo,cafe\n"
    daemon.put(SRC, data, cache="hit")
    resolver = AssetSourceResolver(client=daemon.client, local_root=local_root)
    specs = parse_assets(
        [entry(), {"source": "fixtures/tp2/expected.txt", "target": "/grader/expected.txt"}]
    )
    manifest = resolver.resolve_assets(specs, job="tp2:ref").manifest
    etag = '"' + hashlib.md5(data).hexdigest() + '"'  # noqa: S324 - an S3 ETag
    assert {
        "manifest_version": 1,
        "job": "tp2:ref",
        "assets": [
            {
                "target": "/tmp/RESTAURANTES.CSV",
                "source": SRC,
                "resolved_source": SRC,
                "version_id": None,
                "etag": etag,
                "sha256": sha256(data),
                "size": len(data),
                "cache": "hit",
                "error": None,
            },
            {
                "target": "/grader/expected.txt",
                "source": "fixtures/tp2/expected.txt",
                "resolved_source": "fixtures/tp2/expected.txt",
                "version_id": None,
                "etag": None,
                "sha256": None,
                "size": 16,
                "cache": "local",
                "error": None,
            },
        ],
    } == json.loads(manifest.to_json())


def test_preflight_error_carries_the_manifest(daemon: Daemon) -> None:
    """A failed pre-flight's manifest lists the good asset and the failure's code, in order."""
    daemon.put(SRC, b"ok\n", cache="stale")
    resolver = AssetSourceResolver(client=daemon.client)
    specs = parse_assets([entry(), {"source": MISSING, "target": "/tmp/M.CSV"}])
    with pytest.raises(PreflightError) as info:
        resolver.resolve_assets(specs)
    rows = [a.to_dict() for a in info.value.manifest.assets]
    assert [("stale", None), (None, "not_found")] == [
        (r["cache"], r["error"] and r["error"]["code"]) for r in rows
    ]
    assert not info.value.manifest.ok
