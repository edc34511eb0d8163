"""Parse asset sources: ``s3://bucket/key``, ``asset://name`` or a local relative path.

Rules are DESIGN.md's "Source URIs". Parsing never touches the network and
raises only :class:`MalformedURI` or :class:`UnsupportedScheme`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from assetd.errors import MalformedURI, UnsupportedScheme

__all__ = [
    "AssetAlias",
    "LocalSource",
    "S3Source",
    "check_alias_name",
    "parse_remote",
    "parse_s3",
    "parse_source",
]

MAX_KEY_BYTES = 1024
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# Schemes recognised even without "//", so "s3:bucket/key" is not a file name.
_KNOWN_SCHEMES = frozenset({"s3", "asset", "http", "https", "file", "ftp", "gs", "az", "data"})
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_ALIAS = re.compile(r"[a-z0-9][a-z0-9._/-]{0,255}")


@dataclass(frozen=True, slots=True)
class S3Source:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class LocalSource:
    """A path relative to the grader's local root; resolved grader-side."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True, slots=True)
class AssetAlias:
    """A name in the daemon's asset catalog; the daemon maps it to an ``s3://`` source."""

    name: str

    def __str__(self) -> str:
        return f"asset://{self.name}"


# Unicode category Cc is exactly these code points (C0, DEL, C1)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def _check_segments(path: str, what: str) -> None:
    for seg in path.split("/"):
        if seg in ("", ".", ".."):
            raise MalformedURI(f"{what} has an empty, '.' or '..' path segment")


def _check_bucket(bucket: str) -> None:
    if not bucket:
        raise MalformedURI("source has no bucket name")
    if (
        not _BUCKET.match(bucket)
        or ".." in bucket
        or ".-" in bucket
        or "-." in bucket
        or _IPV4.match(bucket)
    ):
        raise MalformedURI(f"invalid bucket name '{bucket}'")


def _parse_s3_rest(rest: str) -> S3Source:
    bucket, slash, key = rest.partition("/")
    _check_bucket(bucket)
    if not slash or not key:
        raise MalformedURI("source has no object key")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise MalformedURI("object key is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise MalformedURI(f"object key is longer than {MAX_KEY_BYTES} bytes")
    _check_segments(key, "object key")
    return S3Source(bucket, key)


def check_alias_name(name: str) -> str:
    """A catalog name per DESIGN.md, else MalformedURI."""
    if not isinstance(name, str) or not _ALIAS.fullmatch(name):
        raise MalformedURI(
            "asset name must be 1-256 characters of a-z, 0-9, '.', '_', '-', '/', "
            "starting with a letter or digit"
        )
    _check_segments(name, "asset name")
    return name


def parse_source(text: str) -> S3Source | LocalSource | AssetAlias:
    """Parse a source string from a setup config or a request."""
    if not isinstance(text, str):
        raise MalformedURI("source must be a string")
    if not text or text.isspace():
        raise MalformedURI("source is empty")
    if _has_control(text):
        raise MalformedURI("source contains control characters")
    m = _SCHEME.match(text)
    if m and (text[m.end() : m.end() + 1] == "/" or m.group(1).lower() in _KNOWN_SCHEMES):
        scheme = m.group(1)
        if scheme == "asset":
            if not text.startswith("asset://"):
                raise MalformedURI("asset sources must start with 'asset://'")
            return AssetAlias(check_alias_name(text[len("asset://") :]))
        if scheme != "s3":
            # S3:// too: schemes are case-sensitive here so configs stay canonical
            raise UnsupportedScheme(f"unsupported source scheme '{scheme}'")
        if not text.startswith("s3://"):
            raise MalformedURI("s3 sources must start with 's3://'")
        return _parse_s3_rest(text[len("s3://") :])
    if text.startswith("/"):
        raise MalformedURI("local sources must be relative paths")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedURI("source is not valid UTF-8") from None
    _check_segments(text, "local source")
    return LocalSource(text)


@functools.lru_cache(maxsize=4096)
def parse_s3(text: str) -> S3Source:
    """Parse a source the daemon must fetch: only ``s3://`` is accepted.

    Cached: graders ask for the same few sources over and over, and a
    refused source raises every time (exceptions are never cached).
    """
    parsed = parse_remote(text)
    if isinstance(parsed, AssetAlias):
        raise UnsupportedScheme("asset:// names are resolved by the daemon's catalog")
    return parsed


@functools.lru_cache(maxsize=4096)
def parse_remote(text: str) -> S3Source | AssetAlias:
    """Parse a source the daemon answers: ``s3://`` or an ``asset://`` catalog name."""
    parsed = parse_source(text)
    if isinstance(parsed, LocalSource):
        raise UnsupportedScheme("local sources are resolved by the grader, not the daemon")
    return parsed
