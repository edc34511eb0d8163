"""Socket protocol v1: newline-delimited JSON, one object per line.

A request line is at most ``MAX_LINE`` bytes, not counting the newline.
Every response echoes the request's ``id`` (when it had one) and carries
``ok``; failures carry ``error: {code, message, retryable}``. See
docs/protocol.md for the wire format with examples.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from assetd.errors import AssetError, BadRequest

__all__ = [
    "MAX_JOB",
    "MAX_LINE",
    "MAX_PREFETCH",
    "MAX_TIMEOUT_S",
    "OPS",
    "PrefetchItem",
    "Request",
    "Resolved",
    "decode_request",
    "encode",
    "encode_resolved",
    "error_response",
    "ok_response",
]

MAX_LINE = 64 * 1024
OPS = ("ping", "resolve", "prefetch", "stats", "gc", "verify")
MAX_PREFETCH = 1000  # entries in one prefetch request
MAX_TIMEOUT_S = 3600.0  # longest timeout_s a request may ask for
MAX_JOB = 256  # characters in a job label

RequestId = str | int | None
CacheStatus = Literal["hit", "miss", "coalesced", "stale"]


@dataclass(frozen=True, slots=True)
class Resolved:
    source: str
    path: Path
    size: int
    sha256: str
    etag: str
    version_id: str | None
    cache: CacheStatus
    pinned_until: float
    resolved_source: str | None = None  # the s3:// source an asset:// name stood for

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Resolved:
        return Resolved(
            source=str(data["source"]),
            path=Path(data["path"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            etag=str(data["etag"]),
            version_id=data.get("version_id"),
            cache=data["cache"],
            pinned_until=float(data["pinned_until"]),
            resolved_source=data.get("resolved_source"),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source}
        if self.resolved_source is not None:
            out["resolved_source"] = self.resolved_source
        return out | {
            "path": str(self.path),
            "size": self.size,
            "sha256": self.sha256,
            "etag": self.etag,
            "version_id": self.version_id,
            "cache": self.cache,
            "pinned_until": self.pinned_until,
        }


@dataclass(frozen=True, slots=True)
class PrefetchItem:
    source: str
    version_id: str | None = None
    sha256: object = None  # checked per entry by the service: a bad one fails that entry only


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    id: RequestId = None
    source: str = ""
    version_id: str | None = None
    timeout_s: float | None = None
    job: str | None = None
    sources: tuple[PrefetchItem, ...] = field(default_factory=tuple)
    sha256: object = None  # checked by the service (bad_request unless 64 lowercase hex)


def _opt_str(obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"field '{name}' must be a string")
    return value


def _source(obj: dict[str, Any]) -> str:
    value = obj.get("source")
    if not isinstance(value, str):
        raise BadRequest("field 'source' is required and must be a string")
    return value


def _timeout(obj: dict[str, Any]) -> float | None:
    value = obj.get("timeout_s")
    if value is None:
        return None
    try:
        # an int beyond float range (10**400) overflows here: the same answer
        number = float(value) if isinstance(value, int | float) else math.nan
    except OverflowError:
        number = math.nan
    if isinstance(value, bool) or not 0 < number <= MAX_TIMEOUT_S:  # NaN fails too
        raise BadRequest(
            f"field 'timeout_s' must be a number above 0 and at most {MAX_TIMEOUT_S:g}"
        )
    return number


def _job(obj: dict[str, Any]) -> str | None:
    """The caller's label, printable: it goes into the log line of every resolve."""
    job = _opt_str(obj, "job")
    if job is None:
        return None
    if len(job) > MAX_JOB:
        raise BadRequest(f"field 'job' is longer than {MAX_JOB} characters")
    return "".join(c if c.isprintable() else "?" for c in job)


def _request_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise BadRequest("field 'id' must be a string or an integer")
    return rid


def _prefetch_items(obj: dict[str, Any]) -> tuple[PrefetchItem, ...]:
    raw = obj.get("sources")
    if not isinstance(raw, list):
        raise BadRequest("field 'sources' is required and must be a list")
    if len(raw) > MAX_PREFETCH:
        raise BadRequest(f"field 'sources' has more than {MAX_PREFETCH} entries")
    items = []
    for entry in raw:
        if isinstance(entry, str):
            items.append(PrefetchItem(entry))
        elif isinstance(entry, dict):
            items.append(
                PrefetchItem(_source(entry), _opt_str(entry, "version_id"), entry.get("sha256"))
            )
        else:
            raise BadRequest(
                "each entry of 'sources' must be a string or {source, version_id, sha256}"
            )
    return tuple(items)


def peek_id(line: bytes) -> RequestId:
    """The id of a request line that failed validation, if one can be read."""
    try:
        obj = json.loads(line)
        return _request_id(obj) if isinstance(obj, dict) else None
    except (ValueError, RecursionError, AssetError):
        return None


def decode_request(line: bytes) -> Request:
    """Parse and validate one request line (without its newline)."""
    if len(line) > MAX_LINE:
        raise BadRequest(f"request line longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request line is not valid UTF-8") from None
    if not text.strip():
        raise BadRequest("empty request line")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past the C stack
        raise BadRequest("request line is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadRequest("request must be a JSON object")
    rid = _request_id(obj)
    op = obj.get("op")
    if not isinstance(op, str):
        raise BadRequest("field 'op' is required and must be a string")
    if op == "resolve":
        return Request(
            op,
            rid,
            source=_source(obj),
            version_id=_opt_str(obj, "version_id"),
            timeout_s=_timeout(obj),
            job=_job(obj),
            sha256=obj.get("sha256"),
        )
    if op == "prefetch":
        return Request(
            op, rid, sources=_prefetch_items(obj), timeout_s=_timeout(obj), job=_job(obj)
        )
    if op in OPS:
        return Request(op, rid)
    raise BadRequest(f"unknown op '{op[:64]}'")


def ok_response(rid: RequestId, body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {} if rid is None else {"id": rid}
    out["ok"] = True
    out.update(body)
    return out


def error_response(rid: RequestId, err: AssetError) -> dict[str, Any]:
    out: dict[str, Any] = {} if rid is None else {"id": rid}
    out["ok"] = False
    out["error"] = err.to_dict()
    return out


@functools.lru_cache(maxsize=4096)
def _resolved_fields(
    fields: tuple[str, Path, int, str, str, str | None, str, str | None],
) -> str:
    """The JSON members of a resolve answer that stay the same from one hit to the next."""
    source, path, size, sha256, etag, version_id, cache, resolved_source = fields
    body: dict[str, Any] = {"source": source}
    if resolved_source is not None:
        body["resolved_source"] = resolved_source
    body |= {
        "path": str(path),
        "size": size,
        "sha256": sha256,
        "etag": etag,
        "version_id": version_id,
        "cache": cache,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)[1:-1]


def encode_resolved(rid: RequestId, res: Resolved) -> bytes:
    """``encode(ok_response(rid, res.to_dict()))``, without re-serialising what a hit repeats."""
    head = (
        "{"
        if rid is None
        else '{"id":'
        + (str(rid) if isinstance(rid, int) else json.dumps(rid, ensure_ascii=False))
        + ","
    )
    fields = _resolved_fields(
        (
            res.source,
            res.path,
            res.size,
            res.sha256,
            res.etag,
            res.version_id,
            res.cache,
            res.resolved_source,
        )
    )
    try:
        return f'{head}"ok":true,{fields},"pinned_until":{res.pinned_until!r}}}\n'.encode()
    except UnicodeEncodeError:  # a lone surrogate in the id: the general path escapes it
        return encode(ok_response(rid, res.to_dict()))


def encode(message: dict[str, Any]) -> bytes:
    """One response line, newline included."""
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        # a lone surrogate ("\ud800" in the request) echoed in a message: escape it
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"
