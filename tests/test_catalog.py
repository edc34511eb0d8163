"""Unit tests for assetd.catalog: the asset:// catalog file."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

from pathlib import Path

import pytest

from assetd.catalog import CatalogEntry, catalog_path, load_catalog
from assetd.errors import ConfigError, NotFound
from assetd.uri import S3Source

PIN = "3f" * 32
GOOD = f"""
[assets."tp2/restaurantes.csv"]
source = "s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV"
sha256 = "{PIN}"

[assets.barrios]
source = "s3://autograder-assets/datasets/tp2/BARRIOS.CSV"
version_id = "3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_good_catalog(tmp_path: Path) -> None:
    """Every entry is read with its source, version_id and sha256."""
    catalog = load_catalog(_write(tmp_path, GOOD))
    assert {
        "tp2/restaurantes.csv": CatalogEntry(
            "tp2/restaurantes.csv",
            S3Source("autograder-assets", "datasets/tp2/RESTAURANTES.CSV"),
            None,
            PIN,
        ),
        "barrios": CatalogEntry(
            "barrios",
            S3Source("autograder-assets", "datasets/tp2/BARRIOS.CSV"),
            "3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY",
            None,
        ),
    } == dict(catalog.entries)


def test_empty_file_is_an_empty_catalog(tmp_path: Path) -> None:
    """A file with no entries is valid: every name is then not_found."""
    catalog = load_catalog(_write(tmp_path, ""))
    with pytest.raises(NotFound) as info:
        catalog.get("tp2")
    assert "asset://tp2 is not in this host's asset catalog" == info.value.message


BAD = [
    pytest.param('[assets."TP2"]\nsource = "s3://b-b/k"\n', 'assets."TP2": asset name', id="name"),
    pytest.param('[assets."a//b"]\nsource = "s3://b-b/k"\n', 'assets."a//b": asset name', id="seg"),
    pytest.param('[assets."a"]\nversion_id = "v"\n', 'assets."a": source is required', id="nosrc"),
    pytest.param('[assets."a"]\nsource = "http://x/y"\n', 'assets."a": source: unsup', id="http"),
    pytest.param(
        '[assets."a"]\nsource = "asset://b"\n', 'assets."a": source must be an s3', id="al"
    ),
    pytest.param('[assets."a"]\nsource = "data/x"\n', 'assets."a": source must be an s3', id="loc"),
    pytest.param('[assets."a"]\nsource = "s3://Bad/k"\n', 'assets."a": source: invalid', id="bkt"),
    pytest.param(
        '[assets."a"]\nsource = "s3://b-b/k"\nsha256 = "AB"\n', 'assets."a": sha256', id="sha"
    ),
    pytest.param(
        '[assets."a"]\nsource = "s3://b-b/k"\nversion_id = ""\n', 'assets."a": version_id', id="v"
    ),
    pytest.param('[assets."a"]\nsource = "s3://b-b/k"\nmode = 1\n', "unknown field 'mode'", id="f"),
    pytest.param(
        '[assets.a.csv]\nsource = "s3://b-b/k"\n', "unknown field 'csv' (quote", id="dotted"
    ),
    pytest.param("[other]\nx = 1\n", "unknown top-level key 'other'", id="top"),
    pytest.param("assets = 5\n", "assets: expected", id="assets-not-table"),
    pytest.param('[assets."a"\n', "not valid TOML", id="toml"),
    pytest.param('assets."a\\n" = {source = "s3://b-b/k"}\n', 'assets."a\\n": ', id="ctl"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD)
def test_invalid_catalog_is_one_line_naming_the_entry(
    tmp_path: Path, text: str, fragment: str
) -> None:
    """Each invalid catalog fails with one line that names the file and the entry."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_missing_file(tmp_path: Path) -> None:
    """A catalog file that does not exist is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_catalog(tmp_path / "none.toml")
    assert f"{tmp_path / 'none.toml'}: catalog file not found" == str(info.value)


def test_catalog_path_is_relative_to_the_config() -> None:
    """A relative catalog.file is taken relative to the config file's directory."""
    assert "/etc/assetd/catalog.toml" == catalog_path("catalog.toml", "/etc/assetd/config.toml")
    assert "/srv/c.toml" == catalog_path("/srv/c.toml", "/etc/assetd/config.toml")
    assert "c.toml" == catalog_path("c.toml", None)
    assert None is catalog_path(None, "/etc/assetd/config.toml")
