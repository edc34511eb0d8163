"""Unit tests for assetd.protocol: request decoding, responses, encoding (DESIGN.md protocol v1)."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from assetd import errors
from assetd.protocol import (
    MAX_JOB,
    MAX_LINE,
    MAX_PREFETCH,
    MAX_TIMEOUT_S,
    OPS,
    PrefetchItem,
    Request,
    Resolved,
    decode_request,
    encode,
    encode_resolved,
    error_response,
    ok_response,
    peek_id,
)
from assetd.uri import parse_s3


def _line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _strict_loads(data: bytes) -> Any:
    """json.loads that refuses NaN/Infinity: what a non-Python grader's parser accepts."""

    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(data, parse_constant=refuse)


RESOLVED = Resolved(
    source="s3://autograder-assets/datasets/tp2/RESTAURANTES.CSV",
    path=Path("/var/cache/assetd/blobs/sha256/3f/" + "3f" * 32),
    size=48213,
    sha256="3f" * 32,
    etag='"9b2c0000000000000000000000000000"',
    version_id=None,
    cache="miss",
    pinned_until=1764150000.0,
)


# -- decode_request: every op ------------------------------------------------------------


def test_ops_are_the_design_ops() -> None:
    """OPS is DESIGN.md's request table plus issue 11's admin-only maintenance ops."""
    assert ("ping", "resolve", "prefetch", "stats", "gc", "verify") == OPS


def test_decode_ping() -> None:
    """A ping with an id decodes to a bare ping request."""
    assert Request("ping", "p1") == decode_request(b'{"op":"ping","id":"p1"}')


def test_decode_ping_without_id() -> None:
    """The id is optional."""
    assert Request("ping", None) == decode_request(b'{"op":"ping"}')


def test_decode_stats() -> None:
    """A stats request decodes with its integer id."""
    assert Request("stats", 7) == decode_request(b'{"op":"stats","id":7}')


def test_decode_resolve_minimal() -> None:
    """A resolve with only a source leaves version_id, timeout_s and job unset."""
    req = decode_request(_line({"op": "resolve", "id": "r1", "source": "s3://b/k"}))
    assert Request("resolve", "r1", source="s3://b/k") == req
    assert None is req.version_id
    assert None is req.timeout_s
    assert None is req.job


def test_decode_resolve_all_fields() -> None:
    """version_id, timeout_s (an int becomes a float) and job are carried through."""
    req = decode_request(
        _line(
            {
                "op": "resolve",
                "id": 3,
                "source": "s3://b/k",
                "version_id": "v-1",
                "timeout_s": 5,
                "job": "job-42",
            }
        )
    )
    expected = Request(
        "resolve", 3, source="s3://b/k", version_id="v-1", timeout_s=5.0, job="job-42"
    )
    assert expected == req
    assert float is type(req.timeout_s)


def test_decode_resolve_null_optionals() -> None:
    """Explicit nulls for optional fields mean absent."""
    req = decode_request(
        _line(
            {
                "op": "resolve",
                "source": "s3://b/k",
                "version_id": None,
                "timeout_s": None,
                "job": None,
            }
        )
    )
    assert Request("resolve", None, source="s3://b/k") == req


def test_decode_resolve_fractional_timeout() -> None:
    """A fractional positive timeout is accepted as is."""
    req = decode_request(_line({"op": "resolve", "source": "s3://b/k", "timeout_s": 0.25}))
    assert 0.25 == req.timeout_s


def test_decode_resolve_keeps_unicode_source() -> None:
    """A non-ASCII source survives decoding byte for byte."""
    req = decode_request(
        '{"op":"resolve","source":"s3://b/données/é.csv"}'.encode(),
    )
    assert "s3://b/données/é.csv" == req.source


def test_decode_prefetch_strings_and_objects() -> None:
    """prefetch takes plain strings and {source, version_id} objects, in order."""
    req = decode_request(
        _line(
            {
                "op": "prefetch",
                "id": "f1",
                "sources": [
                    "s3://b/one",
                    {"source": "s3://b/two", "version_id": "v2"},
                    {"source": "s3://b/three"},
                    {"source": "s3://b/four", "version_id": None},
                ],
                "timeout_s": 30,
            }
        )
    )
    assert "prefetch" == req.op
    assert "f1" == req.id
    assert 30.0 == req.timeout_s
    assert (
        PrefetchItem("s3://b/one"),
        PrefetchItem("s3://b/two", "v2"),
        PrefetchItem("s3://b/three"),
        PrefetchItem("s3://b/four"),
    ) == req.sources


def test_decode_prefetch_empty_list() -> None:
    """An empty prefetch list is a valid (if idle) request."""
    assert () == decode_request(b'{"op":"prefetch","sources":[]}').sources


def test_decode_prefetch_at_the_entry_limit() -> None:
    """Exactly MAX_PREFETCH entries are accepted."""
    line = _line({"op": "prefetch", "sources": [""] * MAX_PREFETCH})
    assert MAX_PREFETCH == len(decode_request(line).sources)


def test_decode_ignores_unknown_fields() -> None:
    """Extra members do not make a request invalid."""
    assert Request("ping", 1) == decode_request(b'{"op":"ping","id":1,"future":[1,2]}')


def test_decode_line_of_exactly_max_line_bytes() -> None:
    """A line of exactly MAX_LINE bytes is not refused for its length."""
    head = b'{"op":"ping","pad":"'
    tail = b'"}'
    line = head + b"x" * (MAX_LINE - len(head) - len(tail)) + tail
    assert MAX_LINE == len(line)
    assert Request("ping") == decode_request(line)


def test_decode_tolerates_surrounding_whitespace() -> None:
    """Whitespace around the object (e.g. a CR before the newline) is JSON whitespace."""
    assert Request("ping", 1) == decode_request(b'  {"op":"ping","id":1}\r')


# -- decode_request: hostile input ------------------------------------------------------

HOSTILE: dict[str, bytes] = {
    "not json": b"hello",
    "truncated json": b'{"op":"ping"',
    "json array": b'["op","ping"]',
    "json number": b"42",
    "json string": b'"ping"',
    "json null": b"null",
    "json true": b"true",
    "unknown op": b'{"op":"delete","source":"s3://b/k"}',
    "op with wrong case": b'{"op":"PING"}',
    "missing op": b'{"id":1,"source":"s3://b/k"}',
    "op is a number": b'{"op":1}',
    "op is null": b'{"op":null}',
    "op is a list": b'{"op":["ping"]}',
    "resolve without source": b'{"op":"resolve"}',
    "resolve source null": b'{"op":"resolve","source":null}',
    "resolve source a number": b'{"op":"resolve","source":5}',
    "resolve source an object": b'{"op":"resolve","source":{"bucket":"b"}}',
    "version_id a number": b'{"op":"resolve","source":"s3://b/k","version_id":3}',
    "version_id a list": b'{"op":"resolve","source":"s3://b/k","version_id":["v"]}',
    "job a number": b'{"op":"resolve","source":"s3://b/k","job":9}',
    "timeout_s zero": b'{"op":"resolve","source":"s3://b/k","timeout_s":0}',
    "timeout_s zero float": b'{"op":"resolve","source":"s3://b/k","timeout_s":0.0}',
    "timeout_s negative": b'{"op":"resolve","source":"s3://b/k","timeout_s":-1}',
    "timeout_s a string": b'{"op":"resolve","source":"s3://b/k","timeout_s":"5"}',
    "timeout_s true": b'{"op":"resolve","source":"s3://b/k","timeout_s":true}',
    "timeout_s false": b'{"op":"resolve","source":"s3://b/k","timeout_s":false}',
    "timeout_s NaN": b'{"op":"resolve","source":"s3://b/k","timeout_s":NaN}',
    "timeout_s Infinity": b'{"op":"resolve","source":"s3://b/k","timeout_s":Infinity}',
    "timeout_s -Infinity": b'{"op":"resolve","source":"s3://b/k","timeout_s":-Infinity}',
    "timeout_s overflows to inf": b'{"op":"resolve","source":"s3://b/k","timeout_s":1e400}',
    "timeout_s a list": b'{"op":"resolve","source":"s3://b/k","timeout_s":[5]}',
    "timeout_s 1e308": b'{"op":"resolve","source":"s3://b/k","timeout_s":1e308}',
    "timeout_s a huge int": b'{"op":"resolve","source":"s3://b/k","timeout_s":' + b"9" * 400 + b"}",
    "timeout_s above the maximum": _line(
        {"op": "resolve", "source": "s3://b/k", "timeout_s": MAX_TIMEOUT_S + 0.001}
    ),
    "job over 256 chars": _line({"op": "resolve", "source": "s3://b/k", "job": "j" * 257}),
    "prefetch job of 60 KB": _line({"op": "prefetch", "sources": [], "job": "j" * 60_000}),
    "prefetch timeout_s 1e308": b'{"op":"prefetch","sources":[],"timeout_s":1e308}',
    "id an object": b'{"op":"ping","id":{"a":1}}',
    "id a list": b'{"op":"ping","id":[1]}',
    "id true": b'{"op":"ping","id":true}',
    "id false": b'{"op":"ping","id":false}',
    "id a float": b'{"op":"ping","id":1.5}',
    "id too many digits": b'{"op":"ping","id":' + b"9" * 5000 + b"}",
    "prefetch without sources": b'{"op":"prefetch"}',
    "prefetch sources a string": b'{"op":"prefetch","sources":"s3://b/k"}',
    "prefetch sources an object": b'{"op":"prefetch","sources":{"source":"s3://b/k"}}',
    "prefetch sources null": b'{"op":"prefetch","sources":null}',
    "prefetch entry a number": b'{"op":"prefetch","sources":["s3://b/k",7]}',
    "prefetch entry null": b'{"op":"prefetch","sources":[null]}',
    "prefetch entry a list": b'{"op":"prefetch","sources":[["s3://b/k"]]}',
    "prefetch entry without source": b'{"op":"prefetch","sources":[{"version_id":"v"}]}',
    "prefetch entry source a number": b'{"op":"prefetch","sources":[{"source":1}]}',
    "prefetch entry version_id a number": (
        b'{"op":"prefetch","sources":[{"source":"s3://b/k","version_id":2}]}'
    ),
    "prefetch timeout_s zero": b'{"op":"prefetch","sources":[],"timeout_s":0}',
    "prefetch over the entry limit": _line(
        {"op": "prefetch", "sources": [""] * (MAX_PREFETCH + 1)}
    ),
    "invalid utf-8": b'{"op":"resolve","source":"s3://b/\xff\xfe"}',
    "lone continuation byte": b"\x80",
    "utf-16 encoded": '{"op":"ping"}'.encode("utf-16"),
    "empty line": b"",
    "whitespace only": b" \t \r ",
    "nul byte": b"\x00",
    "line longer than MAX_LINE": b'{"op":"ping","pad":"' + b"x" * MAX_LINE + b'"}',
    "long garbage": b"x" * (MAX_LINE + 1),
}


@pytest.mark.parametrize("line", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_line_is_bad_request(line: bytes) -> None:
    """Every malformed or ill-typed request line is refused as bad_request, nothing else."""
    with pytest.raises(errors.BadRequest) as info:
        decode_request(line)
    assert "bad_request" == info.value.code
    assert False is info.value.retryable
    assert info.value.message


def test_too_long_line_is_refused_before_parsing() -> None:
    """A line one byte over MAX_LINE is refused for its length even if it is valid JSON."""
    head = b'{"op":"ping","pad":"'
    tail = b'"}'
    line = head + b"x" * (MAX_LINE + 1 - len(head) - len(tail)) + tail
    assert MAX_LINE + 1 == len(line)
    with pytest.raises(errors.BadRequest, match="longer than"):
        decode_request(line)


def test_timeout_at_the_maximum_is_accepted() -> None:
    """timeout_s equal to MAX_TIMEOUT_S (3600) is the largest accepted, as documented."""
    line = _line({"op": "resolve", "source": "s3://b/k", "timeout_s": MAX_TIMEOUT_S})
    assert 3600.0 == decode_request(line).timeout_s == MAX_TIMEOUT_S


def test_job_of_256_chars_is_kept() -> None:
    """A job label of exactly MAX_JOB (256) characters is accepted unchanged."""
    job = "é" * MAX_JOB
    line = _line({"op": "resolve", "source": "s3://b/k", "job": job})
    assert (256, job) == (MAX_JOB, decode_request(line).job)


@pytest.mark.parametrize(
    ("job", "logged"),
    [
        ("tp2\n42", "tp2?42"),
        ("a\x1b[31mred", "a?[31mred"),
        ("x\u2028y\x00z", "x?y?z"),
        ("lone\ud800", "lone?"),
        ("ok job-1/é", "ok job-1/é"),
    ],
)
def test_job_is_sanitised_for_the_log(job: str, logged: str) -> None:
    """Control, separator and surrogate characters in job become '?': one log line, no escapes."""
    line = json.dumps({"op": "resolve", "source": "s3://b/k", "job": job}).encode()
    assert logged == decode_request(line).job


def test_prefetch_limit_is_1000() -> None:
    """The prefetch entry cap is 1000, as docs/protocol.md states."""
    assert 1000 == MAX_PREFETCH


def test_nan_timeout_is_refused_not_accepted() -> None:
    """Python's json accepts NaN; the decoder must still refuse it as a timeout."""
    line = b'{"op":"resolve","source":"s3://b/k","timeout_s":NaN}'
    assert isinstance(json.loads(line)["timeout_s"], float)  # the parser lets it through
    with pytest.raises(errors.BadRequest, match="timeout_s"):
        decode_request(line)


def test_unknown_op_message_is_bounded() -> None:
    """An unknown op's name is truncated in the message (it goes back to the caller)."""
    with pytest.raises(errors.BadRequest) as info:
        decode_request(_line({"op": "x" * 10_000}))
    assert len(info.value.message) < 200


DEEP = 10_000  # well within MAX_LINE: 2 bytes per level


def test_deeply_nested_json_is_bad_request() -> None:
    """A deeply nested (valid) JSON array well under MAX_LINE is refused as bad_request."""
    line = b"[" * DEEP + b"]" * DEEP
    assert len(line) <= MAX_LINE
    with pytest.raises(errors.BadRequest):
        decode_request(line)


def test_peek_id_deeply_nested_is_none() -> None:
    """peek_id gives up (None) on a deeply nested line instead of raising."""
    assert None is peek_id(b'{"id":1,"x":' + b"[" * DEEP + b"]" * DEEP + b"}")


# -- peek_id ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"id":"r9","op":"nope"}', "r9"),
        (b'{"id":12,"op":"resolve"}', 12),
        (b'{"id":"r1","op":"resolve","source":"s3://b/k","timeout_s":-1}', "r1"),
        (b'{"id":5,"op":"prefetch","sources":"x"}', 5),
        (b'{"id":"only-id"}', "only-id"),
    ],
    ids=["unknown op", "missing source", "bad timeout", "bad sources", "missing op"],
)
def test_peek_id_recovers_id(line: bytes, expected: object) -> None:
    """peek_id reads the id from a line that decode_request refuses."""
    with pytest.raises(errors.BadRequest):
        decode_request(line)
    assert expected == peek_id(line)


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"garbage",
        b'{"id":"r1"',
        b'["r1"]',
        b"17",
        b'{"op":"ping"}',
        b'{"id":{"nested":1}}',
        b'{"id":true}',
        b'{"id":2.5}',
        b"\xff\xfe\xfd",
    ],
    ids=[
        "empty",
        "garbage",
        "truncated",
        "array",
        "number",
        "no id",
        "object id",
        "bool id",
        "float id",
        "invalid utf-8",
    ],
)
def test_peek_id_none_for_garbage(line: bytes) -> None:
    """peek_id answers None when no valid id can be read, and never raises."""
    assert None is peek_id(line)


# -- responses ---------------------------------------------------------------------------


def test_ok_response_with_id() -> None:
    """ok_response echoes the id, sets ok true and merges the body."""
    assert {"id": "r1", "ok": True, "version": "0.1.0"} == ok_response("r1", {"version": "0.1.0"})


def test_ok_response_without_id() -> None:
    """Without an id, the answer has no id member at all (not null)."""
    answer = ok_response(None, {"entries": 0})
    assert {"ok": True, "entries": 0} == answer
    assert "id" not in answer


def test_ok_response_zero_id_is_echoed() -> None:
    """An id of 0 (falsy but given) is still echoed."""
    assert {"id": 0, "ok": True} == ok_response(0, {})


def test_ok_response_key_order() -> None:
    """id comes first, then ok, then the body members in order."""
    assert ["id", "ok", "a", "b"] == list(ok_response(1, {"a": 1, "b": 2}))


def test_error_response_with_id() -> None:
    """error_response carries ok false and the error's code, message and retryable flag."""
    answer = error_response("r1", errors.NotFound("object does not exist", detail="host detail"))
    assert {
        "id": "r1",
        "ok": False,
        "error": {"code": "not_found", "message": "object does not exist", "retryable": False},
    } == answer


def test_error_response_without_id() -> None:
    """Without an id there is no id member; ok is present and false."""
    answer = error_response(None, errors.Timeout("deadline passed"))
    assert {
        "ok": False,
        "error": {"code": "timeout", "message": "deadline passed", "retryable": True},
    } == answer


def test_error_response_never_carries_detail() -> None:
    """The host-only detail never reaches the wire."""
    wire = encode(error_response(1, errors.InternalError("boom", detail="/secret/host/path")))
    assert b"/secret/host/path" not in wire


# -- encode ----------------------------------------------------------------------------------


def test_encode_ends_with_exactly_one_newline() -> None:
    """encode gives one line: a single trailing newline and no other."""
    data = encode(ok_response("r1", {"text": "two\nlines"}))
    assert data.endswith(b"\n")
    assert 1 == data.count(b"\n")


def test_encode_round_trips() -> None:
    """encode's output parses back to the same message."""
    message = ok_response("é", {"path": '/a/"b"\\c', "n": 3, "x": None, "l": [1, "2"]})
    assert message == json.loads(encode(message))


def test_encode_is_utf8_not_escaped() -> None:
    """Non-ASCII text is sent as UTF-8, not as \\u escapes."""
    assert "é".encode() in encode({"ok": True, "s": "é"})


def _error_for(line: bytes) -> errors.AssetError:
    """The error the daemon answers for ``line``: decoding, then (for resolve) parsing."""
    try:
        req = decode_request(line)
    except errors.BadRequest as err:
        return err
    try:
        parse_s3(req.source)
    except errors.AssetError as err:
        return err
    raise AssertionError(f"{line!r} was expected to fail")


# JSON's \ud800 escape decodes to a lone surrogate, which no UTF-8 line can carry
SURROGATE_LINES = {
    "unknown op": b'{"id":1,"op":"\\ud800"}',
    "invalid bucket": b'{"id":2,"op":"resolve","source":"s3://\\ud800bucket/k"}',
}


@pytest.mark.parametrize("line", list(SURROGATE_LINES.values()), ids=list(SURROGATE_LINES))
def test_error_answer_echoing_lone_surrogate_is_encodable(line: bytes) -> None:
    """An error answer to a request holding an escaped lone surrogate still encodes."""
    err = _error_for(line)
    answer = json.loads(encode(error_response(peek_id(line), err)))
    assert False is answer["ok"]
    assert err.code == answer["error"]["code"]


def test_encode_resolved_example() -> None:
    """encode_resolved of DESIGN.md's example answer equals the generic encoding."""
    assert json.loads(encode(ok_response("r1", RESOLVED.to_dict()))) == json.loads(
        encode_resolved("r1", RESOLVED)
    )


def test_encode_resolved_lone_surrogate_id() -> None:
    """An id holding a lone surrogate is escaped, as the generic encoder does, not an error."""
    assert json.loads(encode(ok_response("\ud800", RESOLVED.to_dict()))) == json.loads(
        encode_resolved("\ud800", RESOLVED)
    )


def test_encode_resolved_without_id_has_no_id() -> None:
    """Without an id, encode_resolved's answer has no id member."""
    answer = json.loads(encode_resolved(None, RESOLVED))
    assert "id" not in answer
    assert True is answer["ok"]


def test_encode_resolved_ends_with_one_newline() -> None:
    """encode_resolved gives exactly one line."""
    data = encode_resolved(7, RESOLVED)
    assert data.endswith(b"\n")
    assert 1 == data.count(b"\n")


def test_encode_resolved_cache_does_not_mix_answers() -> None:
    """Two answers differing only in cache status or pin do not share a cached body."""
    first = json.loads(encode_resolved(1, RESOLVED))
    other = dataclasses.replace(RESOLVED, cache="hit", pinned_until=1.5)
    second = json.loads(encode_resolved(1, other))
    assert "miss" == first["cache"]
    assert "hit" == second["cache"]
    assert 1.5 == second["pinned_until"]


# -- property tests ---------------------------------------------------------------------------

_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),  # any code point a UTF-8 line can carry
        st.sampled_from(['"', "\\", "/", "\n", "\t", "\x00", "\u2028", "é", "😀"]),
    ),
    max_size=40,
)
_rids = st.one_of(st.none(), st.integers(), _text)
_paths = st.lists(
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"),
        min_size=1,
        max_size=12,
    ),
    min_size=1,
    max_size=4,
).map(lambda parts: Path("/var/cache/assetd/blobs", *parts))
_resolved = st.builds(
    Resolved,
    source=_text,
    path=_paths,
    size=st.integers(min_value=0, max_value=2**63),
    sha256=_text,
    etag=_text,
    version_id=st.one_of(st.none(), _text),
    cache=st.sampled_from(["hit", "miss", "coalesced", "stale"]),
    pinned_until=st.floats(allow_nan=False, allow_infinity=False),
    resolved_source=st.one_of(st.none(), _text),
)


@settings(max_examples=300, deadline=None)
@given(rid=_rids, res=_resolved)
def test_encode_resolved_matches_generic_encoding(rid: Any, res: Resolved) -> None:
    """encode_resolved parses to exactly what encode(ok_response(...)) parses to."""
    fast = encode_resolved(rid, res)
    generic = encode(ok_response(rid, res.to_dict()))
    assert _strict_loads(generic) == _strict_loads(fast)
    assert fast.endswith(b"\n")
    assert 1 == fast.count(b"\n")


@settings(max_examples=200, deadline=None)
@given(res=_resolved)
def test_resolved_dict_round_trip(res: Resolved) -> None:
    """Resolved.from_dict(res.to_dict()) rebuilds an equal Resolved, also through JSON."""
    assert res == Resolved.from_dict(res.to_dict())
    assert res == Resolved.from_dict(json.loads(json.dumps(res.to_dict())))


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
# objects that look like requests, so validation gets past the op check
_request_like = st.fixed_dictionaries(
    {"op": st.sampled_from([*OPS, "other"])},
    optional={
        "id": _json_values,
        "source": _json_values,
        "version_id": _json_values,
        "timeout_s": _json_values,
        "job": _json_values,
        "sources": st.lists(
            st.one_of(
                _json_values,
                st.fixed_dictionaries(
                    {"source": _json_values}, optional={"version_id": _json_values}
                ),
            ),
            max_size=4,
        ),
    },
)


def _decode_or_bad_request(line: bytes) -> None:
    try:
        req = decode_request(line)
    except errors.BadRequest:
        return
    assert isinstance(req, Request)
    assert req.op in OPS


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=200))
def test_decode_arbitrary_bytes(line: bytes) -> None:
    """Arbitrary bytes decode to a Request or raise BadRequest, never anything else."""
    _decode_or_bad_request(line)
    peek_id(line)  # must not raise either


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(_json_values, _request_like))
def test_decode_arbitrary_json(value: Any) -> None:
    """Any JSON value, dumped, decodes to a valid Request or raises BadRequest only."""
    line = json.dumps(value).encode()
    try:
        req = decode_request(line)
    except errors.BadRequest:
        return
    assert isinstance(value, dict)
    assert value["op"] == req.op
    assert req.id is None or (isinstance(req.id, str | int) and not isinstance(req.id, bool))
    if req.timeout_s is not None:
        assert req.timeout_s > 0
    if req.op == "resolve":
        assert isinstance(req.source, str)
    if req.op == "prefetch":
        assert all(isinstance(item.source, str) for item in req.sources)


# -- v2: sha256 pins and resolved_source ------------------------------------------------------


def test_decode_resolve_carries_sha256_raw() -> None:
    """resolve passes sha256 through as sent; the service validates it (bad_request)."""
    pin = "ab" * 32
    assert (
        pin == decode_request(_line({"op": "resolve", "source": "s3://b/k", "sha256": pin})).sha256
    )
    odd = decode_request(_line({"op": "resolve", "source": "s3://b/k", "sha256": 5}))
    assert 5 == odd.sha256
    assert None is decode_request(_line({"op": "resolve", "source": "s3://b/k"})).sha256


def test_decode_prefetch_entry_sha256_is_per_entry() -> None:
    """A prefetch entry's sha256 travels with that entry; a bad one does not fail the request."""
    req = decode_request(
        _line(
            {
                "op": "prefetch",
                "sources": [
                    {"source": "s3://b/a", "sha256": "cd" * 32},
                    {"source": "s3://b/b", "sha256": "NOT-HEX"},
                    "s3://b/c",
                ],
            }
        )
    )
    assert [
        PrefetchItem("s3://b/a", None, "cd" * 32),
        PrefetchItem("s3://b/b", None, "NOT-HEX"),
        PrefetchItem("s3://b/c"),
    ] == list(req.sources)


def test_resolved_source_only_for_aliases() -> None:
    """resolved_source follows source on the wire for an alias, and is absent otherwise."""
    alias = dataclasses.replace(
        RESOLVED, source="asset://tp2/data", resolved_source=RESOLVED.source
    )
    body = json.loads(encode_resolved(7, alias))
    assert ["id", "ok", "source", "resolved_source", "path"] == list(body)[:5]
    assert RESOLVED.source == body["resolved_source"]
    assert "resolved_source" not in json.loads(encode_resolved(7, RESOLVED))
