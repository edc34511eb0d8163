"""The asset catalog: ``asset://<name>`` aliases for ``s3://`` sources.

A TOML file named by ``catalog.file`` (env ``ASSETD_CATALOG_FILE``)::

    [assets."tp2/restaurantes"]
    source = "s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV"
    version_id = "3HL4kqtJlcpXroDTDmJ-rmSpXd3dIbrHY"   # optional
    sha256 = "3f9a..."                                   # optional: pins the alias

Assignments name ``asset://tp2/restaurantes`` and need not hard-code a
bucket. The daemon reads the file at start (an invalid one stops start-up
with one line naming the entry) and again on reload, where an invalid one
is refused and the running catalog kept. Policy applies to each entry's
``s3://`` source at resolve time, so an alias never widens the allowlists.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from assetd.config import read_toml
from assetd.errors import AssetError, ConfigError, NotFound
from assetd.pins import is_sha256
from assetd.uri import S3Source, check_alias_name, parse_source

__all__ = ["Catalog", "CatalogEntry", "catalog_path", "load_catalog"]

_FIELDS = frozenset({"source", "version_id", "sha256"})


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    name: str
    source: S3Source
    version_id: str | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "name": self.name,
            "source": str(self.source),
            "version_id": self.version_id,
            "sha256": self.sha256,
        }


@dataclass(frozen=True, slots=True)
class Catalog:
    """The entries of one catalog file, by name."""

    path: str
    entries: Mapping[str, CatalogEntry]

    def get(self, name: str) -> CatalogEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise NotFound(f"asset://{name} is not in this host's asset catalog")
        return entry


def _entry(name: str, table: object) -> CatalogEntry:
    """One validated entry; ValueError with the reason otherwise."""
    try:
        check_alias_name(name)
    except AssetError as exc:
        raise ValueError(exc.message) from None
    if not isinstance(table, dict):
        raise ValueError('expected a table with source = "s3://..."')
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        hint = " (quote a name with '.' in it)" if isinstance(table[unknown[0]], dict) else ""
        raise ValueError(f"unknown field '{unknown[0]}'{hint}")
    source = table.get("source")
    if not isinstance(source, str):
        raise ValueError('source is required: source = "s3://bucket/key"')
    try:
        parsed = parse_source(source)
    except AssetError as exc:
        raise ValueError(f"source: {exc.message}") from None
    if not isinstance(parsed, S3Source):
        raise ValueError("source must be an s3:// URI")
    version_id = table.get("version_id")
    if version_id is not None and (
        not isinstance(version_id, str)
        or not version_id
        or len(version_id) > 1024
        or any(unicodedata.category(c) == "Cc" for c in version_id)
    ):
        raise ValueError("version_id must be a non-empty string without control characters")
    sha256 = table.get("sha256")
    if sha256 is not None and not is_sha256(sha256):
        raise ValueError("sha256 must be 64 lowercase hex characters")
    return CatalogEntry(name, parsed, version_id, sha256)


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; ConfigError (one line, naming the entry) if invalid."""
    where = str(path)
    raw = read_toml(where, "catalog")
    unknown = sorted(set(raw) - {"assets"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key '{unknown[0]}'")
    tables = raw.get("assets", {})
    if not isinstance(tables, dict):
        raise ConfigError(f'{where}: assets: expected [assets."<name>"] tables')
    entries: dict[str, CatalogEntry] = {}
    for name, table in tables.items():
        try:
            entries[name] = _entry(name, table)
        except ValueError as exc:
            # json.dumps: the name quoted as in the file, control characters escaped
            raise ConfigError(f"{where}: assets.{json.dumps(name)}: {exc}") from None
    return Catalog(where, MappingProxyType(entries))


def catalog_path(file: str | None, config_path: str | None) -> str | None:
    """``catalog.file`` as a path: a relative one is relative to the config file's directory."""
    if not file:
        return None
    if os.path.isabs(file) or not config_path:
        return file
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), file)
