"""Unit tests for the CLI's v2 parts: catalog list|check, lock, pins (CliRunner, a fake daemon)."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from assetd.cli import cli
from tests.support.fakedaemon import FakeDaemon
from tests.test_cli import error_body, resolved_body

SRC = "s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV"
CATALOG = f"""
[assets."tp2/data"]
source = "{SRC}"
sha256 = "{"ab" * 32}"

[assets.gone]
source = "s3://autograder-assets/datasets/gone.csv"
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="assetd")


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    return path


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    if request["source"] == "asset://tp2/data":
        return {**resolved_body("asset://tp2/data", "hit"), "resolved_source": SRC}
    return error_body("not_found", "object s3://autograder-assets/datasets/gone.csv is gone")


@pytest.fixture
def fake(sock_path: str) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(sock_path, _answer).start()
    yield daemon
    daemon.stop()


def test_catalog_list_prints_every_entry(catalog: Path) -> None:
    """list needs no daemon: one line per entry with its pins; --json has every field."""
    text = run("catalog", "list", "--file", str(catalog))
    as_json = json.loads(run("catalog", "list", "--file", str(catalog), "--json").stdout)
    assert 0 == text.exit_code
    assert [
        f"# catalog file: {catalog} (2 entries)",
        f"asset://tp2/data -> {SRC} sha256={'ab' * 32}",
        "asset://gone -> s3://autograder-assets/datasets/gone.csv",
    ] == text.stdout.splitlines()
    assert ["tp2/data", "gone"] == [e["name"] for e in as_json["entries"]]


def test_catalog_from_config_key(catalog: Path, tmp_path: Path) -> None:
    """Without --file, catalog.file of the config names the catalog (relative to the config)."""
    config = tmp_path / "assetd.toml"
    config.write_text('[catalog]\nfile = "catalog.toml"\n')
    assert 0 == run("catalog", "list", "--config", str(config)).exit_code


def test_catalog_invalid_or_missing_exits_2(tmp_path: Path) -> None:
    """An invalid catalog is exit 2 with one line naming the entry; no catalog at all too."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[assets."x"]\nsource = "data/x.csv"\n')
    invalid = run("catalog", "list", "--file", str(bad))
    none = run("catalog", "list", "--config", str(tmp_path / "empty.toml"))
    assert (2, [f'assetd: invalid catalog: {bad}: assets."x": source must be an s3:// URI']) == (
        invalid.exit_code,
        invalid.stderr.splitlines(),
    )
    assert 2 == none.exit_code


def test_catalog_check_resolves_each_name(catalog: Path, fake: FakeDaemon, sock_path: str) -> None:
    """check asks the daemon for every asset:// name and exits 1 when one fails."""
    result = run("catalog", "check", "--file", str(catalog), "--socket", sock_path)
    assert 1 == result.exit_code
    assert [
        f"ok   asset://tp2/data -> {SRC} sha256 {'cd' * 6} 10 bytes",
        "FAIL asset://gone: not_found: object s3://autograder-assets/datasets/gone.csv is gone",
        f"{catalog}: 1 of 2 resolve",
    ] == result.stdout.splitlines()
    assert ["asset://tp2/data", "asset://gone"] == [r["source"] for r in fake.requests]


def test_lock_check_exit_codes(fake: FakeDaemon, sock_path: str, tmp_path: Path) -> None:
    """lock writes the pin (exit 0); --check then matches (exit 0); a failing asset is exit 1."""
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps({"assets": [{"source": "asset://tp2/data", "target": "/t"}]}))
    locked = run("lock", str(setup), "--socket", sock_path)
    pinned = json.loads(setup.read_text())["assets"][0].get("sha256")
    check = run("lock", "--check", str(setup), "--socket", sock_path)
    setup.write_text(json.dumps({"assets": [{"source": "asset://gone", "target": "/t"}]}))
    failing = run("lock", str(setup), "--socket", sock_path)
    assert (0, "cd" * 32) == (locked.exit_code, pinned)
    assert 0 == check.exit_code, check.output
    assert 1 == failing.exit_code
    assert f"{setup}: not written: 1 assets failed" in failing.stderr


def test_lock_check_and_upgrade_together_is_a_usage_error(tmp_path: Path) -> None:
    """--check and --upgrade contradict each other: exit 2."""
    setup = tmp_path / "setup.json"
    setup.write_text("{}")
    assert 2 == run("lock", "--check", "--upgrade", str(setup)).exit_code


def test_get_and_prefetch_send_pins(sock_path: str, tmp_path: Path) -> None:
    """get --sha256 sends the pin; prefetch of a locked setup config sends each entry's pin."""
    pin = "ef" * 32
    fake = FakeDaemon(
        sock_path,
        lambda r: (
            {"results": [{"ok": True, **resolved_body(SRC)}]}
            if r["op"] == "prefetch"
            else resolved_body(SRC)
        ),
    ).start()
    try:
        setup = tmp_path / "setup.json"
        setup.write_text(json.dumps({"assets": [{"source": SRC, "sha256": pin, "target": "/t"}]}))
        got = run("get", SRC, "--sha256", pin, "--socket", sock_path)
        warmed = run("prefetch", str(setup), "--socket", sock_path)
    finally:
        fake.stop()
    assert (0, 0) == (got.exit_code, warmed.exit_code)
    assert pin == fake.requests[0]["sha256"]
    assert [{"source": SRC, "version_id": None, "sha256": pin}] == fake.requests[1]["sources"]


def test_check_resolves_asset_names_through_the_catalog(catalog: Path, tmp_path: Path) -> None:
    """`assetd check asset://…`: no catalog, an unknown name, a name outside the allowlists."""
    bare = tmp_path / "bare.toml"
    bare.write_text("")
    config = tmp_path / "assetd.toml"
    config.write_text(
        f'[catalog]\nfile = "{catalog}"\n[s3]\nallowed_buckets = ["elsewhere"]\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
    )
    none = run("check", "asset://tp2/data", "--config", str(bare), "--json")
    unknown = run("check", "asset://nope", "--config", str(config), "--json")
    outside = run("check", "asset://tp2/data", "--config", str(config), "--json")
    assert ["unsupported_scheme", "not_found", "not_allowed"] == [
        json.loads(r.stdout)["error"]["code"] for r in (none, unknown, outside)
    ]
    assert SRC == json.loads(outside.stdout)["catalog"]["source"]
