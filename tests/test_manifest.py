"""Unit tests for assetd.manifest: stable keys, stable order, plain JSON."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from assetd.manifest import Manifest, ManifestEntry

KEYS = [
    "target",
    "source",
    "resolved_source",
    "version_id",
    "etag",
    "sha256",
    "size",
    "cache",
    "error",
]

_opt = st.one_of(st.none(), st.text(max_size=20))
_entries = st.builds(
    ManifestEntry,
    target=st.text(max_size=20),
    source=st.text(max_size=20),
    resolved_source=_opt,
    version_id=_opt,
    etag=_opt,
    sha256=_opt,
    size=st.one_of(st.none(), st.integers(min_value=0, max_value=2**63)),
    cache=_opt,
    error=st.one_of(st.none(), st.fixed_dictionaries({"code": st.text(), "message": st.text()})),
)


@given(entries=st.lists(_entries, max_size=5), job=_opt)
def test_every_entry_has_the_same_keys_in_the_same_order(
    entries: list[ManifestEntry], job: str | None
) -> None:
    """Keys are always all present, in one order, and the JSON round-trips."""
    manifest = Manifest.of(entries, job)
    parsed = json.loads(manifest.to_json())
    assert ["manifest_version", "job", "assets"] == list(parsed)
    assert [KEYS] * len(entries) == [list(a) for a in parsed["assets"]]
    assert manifest.to_dict() == parsed


def test_to_json_is_deterministic_and_ends_with_newline() -> None:
    """The same manifest serialises to the same text, newline-terminated."""
    m = Manifest.of([ManifestEntry("/t", "s3://b/k", sha256="ab" * 32, size=3, cache="hit")])
    assert m.to_json() == Manifest.of(list(m.assets)).to_json()
    assert m.to_json().endswith("}\n")
    assert m.ok
    assert not Manifest.of([ManifestEntry("/t", "s", error={"code": "x", "message": "y"})]).ok
