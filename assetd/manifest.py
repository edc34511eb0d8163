"""The per-job manifest: which bytes each asset of a grading job got.

A grade should name the exact content it was computed against. The grader
writes the manifest beside the verdict: per asset its target, the source as
written, the ``s3://`` source it resolved to, version_id, ETag, sha256, size
and cache status, or the error it failed with. Plain JSON, keys always
present and always in the same order, so two manifests diff cleanly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["MANIFEST_VERSION", "Manifest", "ManifestEntry"]

MANIFEST_VERSION = 1


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    target: str
    source: str
    resolved_source: str | None = None
    version_id: str | None = None
    etag: str | None = None
    sha256: str | None = None
    size: int | None = None
    cache: str | None = None  # hit, miss, coalesced, stale, or local
    error: dict[str, str] | None = None  # {code, message} when this asset failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "resolved_source": self.resolved_source,
            "version_id": self.version_id,
            "etag": self.etag,
            "sha256": self.sha256,
            "size": self.size,
            "cache": self.cache,
            "error": None if self.error is None else dict(self.error),
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    """Every asset of one job, in the setup config's order."""

    assets: tuple[ManifestEntry, ...]
    job: str | None = None

    @staticmethod
    def of(entries: Iterable[ManifestEntry], job: str | None = None) -> Manifest:
        return Manifest(tuple(entries), job)

    @property
    def ok(self) -> bool:
        return all(e.error is None for e in self.assets)

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION,
            "job": self.job,
            "assets": [e.to_dict() for e in self.assets],
        }

    def to_json(self) -> str:
        """Indented JSON with a final newline, ready to be written beside a verdict."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
