"""Unit tests for assetd.uri: the source grammar of DESIGN.md "Source URIs"."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from assetd.errors import AssetError, MalformedURI, UnsupportedScheme
from assetd.uri import (
    AssetAlias,
    LocalSource,
    S3Source,
    check_alias_name,
    parse_remote,
    parse_s3,
    parse_source,
)

M = MalformedURI
U = UnsupportedScheme

HOSTILE: list[tuple[str, str, type[AssetError]]] = [
    # id, input, expected error
    ("empty", "", M),
    ("space", " ", M),
    ("whitespace-mix", " \t ", M),
    ("leading-space", " s3://bucket/key", M),
    ("scheme-only", "s3://", M),
    ("no-bucket", "s3:///k", M),
    ("bucket-only", "s3://bucket", M),
    ("bucket-slash", "s3://bucket/", M),
    ("s3-no-slashes", "s3:bucket/key", M),
    ("s3-one-slash", "s3:/bucket/key", M),
    ("bucket-too-short", "s3://ab/key", M),
    ("bucket-too-long-64", "s3://" + "a" * 64 + "/key", M),
    ("bucket-uppercase", "s3://Bucket/key", M),
    ("bucket-underscore", "s3://my_bucket/key", M),
    ("bucket-double-dot", "s3://a..b/key", M),
    ("bucket-ip", "s3://192.168.1.1/key", M),
    ("bucket-leading-dash", "s3://-bucket/key", M),
    ("bucket-trailing-dash", "s3://bucket-/key", M),
    ("bucket-trailing-dot", "s3://bucket./key", M),
    ("bucket-leading-dot", "s3://.bucket/key", M),
    ("bucket-dot-dash", "s3://my.-bucket/key", M),
    ("bucket-dash-dot", "s3://my-.bucket/key", M),
    ("bucket-non-ascii", "s3://bücket/key", M),
    ("key-dotdot", "s3://bucket/../etc/passwd", M),
    ("key-dotdot-middle", "s3://bucket/a/../b", M),
    ("key-dotdot-end", "s3://bucket/a/..", M),
    ("key-dot", "s3://bucket/./a", M),
    ("key-dot-only", "s3://bucket/.", M),
    ("key-empty-segment", "s3://bucket/a//b", M),
    ("key-leading-slash", "s3://bucket//a", M),
    ("key-trailing-slash", "s3://bucket/a/", M),
    ("key-nul", "s3://bucket/a\x00b", M),
    ("key-newline", "s3://bucket/a\nb", M),
    ("key-cr", "s3://bucket/a\rb", M),
    ("key-tab", "s3://bucket/a\tb", M),
    ("key-del", "s3://bucket/a\x7fb", M),
    ("key-nel", "s3://bucket/a\x85b", M),
    ("key-esc", "s3://bucket/a\x1bb", M),
    ("bucket-nul", "s3://buc\x00ket/key", M),
    ("key-1025-bytes", "s3://bucket/" + "k" * 1025, M),
    ("key-1025-bytes-utf8", "s3://bucket/" + "é" * 512 + "k", M),
    ("key-lone-surrogate", "s3://bucket/a\ud800b", M),
    ("bucket-lone-surrogate", "s3://buc\ud800ket/key", M),
    ("http", "http://example.com/a.csv", U),
    ("https", "https://example.com/a.csv", U),
    ("file", "file:///etc/passwd", U),
    ("asset-no-slashes", "asset:x/y", M),
    ("asset-one-slash", "asset:/x", M),
    ("asset-empty-name", "asset://", M),
    ("asset-uppercase", "asset://Tp2", M),
    ("asset-leading-dot", "asset://.x", M),
    ("asset-leading-dash", "asset://-x", M),
    ("asset-leading-slash", "asset:///x", M),
    ("asset-trailing-slash", "asset://x/", M),
    ("asset-empty-segment", "asset://x//y", M),
    ("asset-dot-segment", "asset://x/./y", M),
    ("asset-dotdot-segment", "asset://x/../y", M),
    ("asset-space", "asset://x y", M),
    ("asset-query", "asset://x?y", M),
    ("asset-non-ascii", "asset://dätä", M),
    ("asset-257-chars", "asset://" + "a" * 257, M),
    ("asset-uppercase-scheme", "ASSET://x", U),
    ("s3-uppercase", "S3://bucket/key", U),
    ("s3-mixed-case", "S3://Bucket/key", U),
    ("gs-no-slashes", "gs:b/k", U),
    ("gs", "gs://bucket/key", U),
    ("ftp", "ftp://host/file", U),
    ("data", "data:text/plain,hello", U),
    ("unknown-scheme-slashes", "foo://bar/baz", U),
    ("local-absolute", "/etc/passwd", M),
    ("local-dotdot", "../x", M),
    ("local-dotdot-inner", "a/../../x", M),
    ("local-dot", "./x", M),
    ("local-empty-segment", "a//b", M),
    ("local-trailing-slash", "a/", M),
    ("local-control", "a\x00b", M),
    ("local-lone-surrogate", "a\ud800b", M),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_input_is_rejected(text: str, expected: type[AssetError]) -> None:
    """Each hostile source raises exactly the expected error class."""
    with pytest.raises((MalformedURI, UnsupportedScheme)) as info:
        parse_source(text)
    assert expected is type(info.value)


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
def test_hostile_message_is_deterministic(text: str, expected: type[AssetError]) -> None:
    """The same bad input gives the same non-empty, single-line message every time."""
    messages = []
    for _ in range(2):
        with pytest.raises(expected) as info:
            parse_source(text)
        messages.append(info.value.message)
    assert messages[0] == messages[1]
    assert messages[0]
    assert "\n" not in messages[0]


@pytest.mark.parametrize("text", [1, None, b"s3://bucket/key"])
def test_non_string_is_malformed(text: object) -> None:
    """A source that is not a str is malformed, not a TypeError."""
    with pytest.raises(MalformedURI):
        parse_source(text)  # type: ignore[arg-type]


VALID: list[tuple[str, str, str]] = [
    # input, bucket, key
    (
        "s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV",
        "autograder-assets",
        "datasets/tp2/RESTAURANTES.CSV",
    ),
    ("s3://abc/k", "abc", "k"),
    ("s3://" + "a" * 63 + "/k", "a" * 63, "k"),
    ("s3://my.bucket-1/k", "my.bucket-1", "k"),
    ("s3://bucket/my file with spaces.csv", "bucket", "my file with spaces.csv"),
    ("s3://bucket/a%20b%2F..%2Fc", "bucket", "a%20b%2F..%2Fc"),
    ("s3://bucket/k?versionId=abc123", "bucket", "k?versionId=abc123"),
    ("s3://bucket/données/été/ファイル.csv", "bucket", "données/été/ファイル.csv"),
    ("s3://bucket/a...b/..c/.d/e.", "bucket", "a...b/..c/.d/e."),
    ("s3://bucket/k#frag", "bucket", "k#frag"),
    ("s3://bucket/trailing space ", "bucket", "trailing space "),
]


@pytest.mark.parametrize(("text", "bucket", "key"), VALID)
def test_valid_s3_source(text: str, bucket: str, key: str) -> None:
    """Valid s3:// sources parse to the raw bucket and key (no percent-decoding)."""
    parsed = parse_source(text)
    assert S3Source(bucket, key) == parsed
    assert S3Source(bucket, key) == parse_s3(text)
    assert text == str(parsed)


def test_key_of_exactly_1024_bytes_is_accepted() -> None:
    """A 1024-byte ASCII key is the longest accepted."""
    parsed = parse_s3("s3://bucket/" + "k" * 1024)
    assert 1024 == len(parsed.key.encode())


def test_key_limit_counts_utf8_bytes_not_characters() -> None:
    """512 two-byte characters (1024 bytes) pass; 513 (1026 bytes, 513 chars) fail."""
    assert 1024 == len(parse_s3("s3://bucket/" + "é" * 512).key.encode("utf-8"))
    with pytest.raises(MalformedURI):
        parse_s3("s3://bucket/" + "é" * 513)


def test_key_limit_with_three_byte_characters() -> None:
    """341 three-byte characters plus one byte is exactly 1024 bytes and passes."""
    key = "€" * 341 + "a"
    assert key == parse_s3("s3://bucket/" + key).key
    with pytest.raises(MalformedURI):
        parse_s3("s3://bucket/" + key + "a")


@pytest.mark.parametrize(
    "text", ["data/x.csv", "x.csv", "tp2/RESTAURANTES.CSV", "with space/é.csv", "C:foo"]
)
def test_local_relative_source(text: str) -> None:
    """A source without a known scheme is a local relative path, kept as is."""
    assert LocalSource(text) == parse_source(text)


@pytest.mark.parametrize("text", ["data/x.csv", "x.csv"])
def test_parse_s3_refuses_local_source(text: str) -> None:
    """The daemon answers unsupported_scheme for a local source."""
    with pytest.raises(UnsupportedScheme):
        parse_s3(text)


def test_invalid_bucket_is_malformed_not_unsupported() -> None:
    """parse_s3 reports a bad bucket name as malformed_uri."""
    with pytest.raises(MalformedURI):
        parse_s3("s3://Bad_Bucket/key")


_ALLOWED_ERRORS = (MalformedURI, UnsupportedScheme)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789._/-")


def _check_alias(name: str) -> None:
    """DESIGN.md's name rules, stated independently of the parser's regex."""
    assert 1 <= len(name) <= 256
    assert set(name) <= _NAME_CHARS
    assert name[0].isascii() and name[0].isalnum()
    assert all(seg not in ("", ".", "..") for seg in name.split("/"))


def _check_result(text: str) -> None:
    try:
        parsed = parse_source(text)
    except _ALLOWED_ERRORS:
        return
    assert not any(unicodedata.category(c) == "Cc" for c in text)
    if isinstance(parsed, AssetAlias):
        assert text == str(parsed)
        _check_alias(parsed.name)
    elif isinstance(parsed, S3Source):
        assert text == str(parsed)
        assert 1 <= len(parsed.key.encode("utf-8")) <= 1024
        assert 3 <= len(parsed.bucket) <= 63
        assert all(seg not in ("", ".", "..") for seg in parsed.key.split("/"))
    else:
        assert text == parsed.path
        assert not parsed.path.startswith("/")
        assert all(seg not in ("", ".", "..") for seg in parsed.path.split("/"))


@given(st.text())
def test_parse_source_arbitrary_text(text: str) -> None:
    """Any text either parses to a well-formed source or raises only the two URI errors."""
    _check_result(text)


@given(st.text())
def test_parse_source_arbitrary_s3_text(rest: str) -> None:
    """Any "s3://" + text parses to a well-formed S3 source or raises only URI errors."""
    _check_result("s3://" + rest)


@given(
    bucket=st.from_regex(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", fullmatch=True),
    key=st.text(min_size=1, max_size=50),
)
def test_parse_s3_structured(bucket: str, key: str) -> None:
    """Bucket-shaped and key-shaped inputs parse or fail only with URI errors."""
    _check_result(f"s3://{bucket}/{key}")


ALIASES = ["tp2", "tp2/restaurantes.csv", "course-2026_s1/v1.2/data", "0", "a" * 256, "a.b/c..d"]


@pytest.mark.parametrize("name", ALIASES)
def test_asset_alias_parses(name: str) -> None:
    """asset://<name> parses to an AssetAlias on both the grader's and the daemon's parser."""
    assert AssetAlias(name) == parse_source(f"asset://{name}")
    assert AssetAlias(name) == parse_remote(f"asset://{name}")
    assert f"asset://{name}" == str(parse_source(f"asset://{name}"))


def test_parse_s3_refuses_alias_and_parse_remote_refuses_local() -> None:
    """parse_s3 stays s3-only; the daemon's parser refuses local paths."""
    with pytest.raises(UnsupportedScheme):
        parse_s3("asset://tp2")
    with pytest.raises(UnsupportedScheme):
        parse_remote("data/x.csv")


@given(st.text())
def test_parse_source_arbitrary_asset_text(rest: str) -> None:
    """Any "asset://" + text is a well-formed alias or raises only URI errors."""
    _check_result("asset://" + rest)


@given(st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,300}", fullmatch=True))
def test_alias_name_shaped_inputs(name: str) -> None:
    """Name-shaped inputs are accepted exactly when they meet DESIGN.md's rules."""
    try:
        check_alias_name(name)
    except MalformedURI:
        ok = False
    else:
        ok = True
    rules = len(name) <= 256 and all(seg not in ("", ".", "..") for seg in name.split("/"))
    assert rules == ok
