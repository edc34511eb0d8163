"""``assetd lock``: pin every asset of a setup config to the content it has now.

The teacher's publishing step. Each ``s3://`` and ``asset://`` asset is
resolved through the daemon, and its ``version_id`` (on a versioned bucket)
and ``sha256`` are written into the entry, in place. Key order and
indentation are kept as far as JSON allows (new keys go right after
``source``). ``--check`` writes nothing: it resolves the current objects and
lists every entry whose content is no longer the locked one.

Local sources are left alone: they are part of the assignment's own files.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from assetd.client import AssetdClient
from assetd.errors import AssetError, BadRequest
from assetd.grader import AssetSpec
from assetd.protocol import Resolved
from assetd.uri import AssetAlias, LocalSource, parse_source

__all__ = ["LockEntry", "LockReport", "dumps_like", "lock_setup"]

Status = Literal["locked", "unchanged", "current", "drifted", "unlocked", "skipped", "error"]
_PROBLEMS = ("drifted", "unlocked", "error")


@dataclass
class LockEntry:
    """What lock (or --check) did with one asset."""

    index: int
    target: str
    source: str
    status: Status
    locked: dict[str, str | None] = field(default_factory=dict)  # version_id/sha256 in the file
    current: dict[str, str | None] = field(default_factory=dict)  # what the daemon answered
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "target": self.target,
            "source": self.source,
            "status": self.status,
            "locked": self.locked,
            "current": self.current,
            "error": self.error,
        }

    def line(self) -> str:
        head = f"{self.status:<9} {self.target} <- {self.source}"
        if self.error is not None:
            return f"{head}: {self.error['code']}: {self.error['message']}"
        if self.status == "skipped":
            return f"{head}: local source, not locked"
        if self.status in ("drifted", "unlocked"):
            was = _short(self.locked)
            return f"{head}: locked {was or 'nothing'}, now {_short(self.current)}"
        return f"{head}: {_short(self.current)}"


def _short(pins: dict[str, str | None]) -> str:
    parts = []
    if pins.get("version_id"):
        parts.append(f"version_id {pins['version_id']}")
    if pins.get("sha256"):
        parts.append(f"sha256 {str(pins['sha256'])[:12]}")
    return ", ".join(parts)


@dataclass
class LockReport:
    path: str
    check: bool
    entries: list[LockEntry]
    written: bool = False

    @property
    def problems(self) -> list[LockEntry]:
        return [e for e in self.entries if e.status in _PROBLEMS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "check": self.check,
            "written": self.written,
            "entries": [e.to_dict() for e in self.entries],
        }


def _entries(data: Any) -> list[Any]:
    items = data.get("assets", []) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise BadRequest("'assets' must be a list")
    return items


def dumps_like(original: str, data: Any) -> str:
    """``data`` as JSON laid out like ``original``: its indent unit and final newline."""
    m = re.search(r"\n([ \t]+)\S", original)
    if m is None:  # everything on one line
        text = json.dumps(data, ensure_ascii=False)
    else:
        indent = m.group(1)
        unit: str | int = indent if indent.startswith("\t") else len(indent)
        text = json.dumps(data, indent=unit, ensure_ascii=False)
    return text + ("\n" if original.endswith("\n") else "")


def _with_pins(entry: dict[str, Any], pins: dict[str, str]) -> dict[str, Any]:
    """``entry`` with ``pins`` set: updated where present, else inserted after ``source``."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        out[key] = pins.get(key, value)
        if key == "source":
            for name, pin in pins.items():
                if name not in entry:
                    out[name] = pin
    return out


def _pins_of(res: Resolved, alias: bool) -> dict[str, str]:
    pins: dict[str, str] = {}
    # an alias's version comes from the catalog: a request may only repeat it, so it
    # stays out of the setup config; "null" is the unversioned slot, not a version
    if not alias and res.version_id and res.version_id != "null":
        pins["version_id"] = res.version_id
    pins["sha256"] = res.sha256
    return pins


Resolve = Callable[[str, str | None, str | None], Resolved]  # source, version_id, sha256


def lock_setup(
    path: str | os.PathLike[str],
    client: AssetdClient,
    *,
    check: bool = False,
    upgrade: bool = False,
    timeout_s: float | None = None,
) -> LockReport:
    """Lock (or check) every remote asset of the setup config at ``path``.

    Writes the file only if every remote asset resolved (all or nothing).
    Raises AssetError for a file that is not a valid setup config;
    a daemon that cannot be reached raises DaemonUnreachable.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"not valid JSON: {exc}") from None
    items = _entries(data)
    specs = []
    for i, item in enumerate(items):
        try:
            specs.append(AssetSpec.from_dict(item))
        except AssetError as exc:
            raise type(exc)(f"assets[{i}]: {exc.message}") from None

    def resolve(source: str, version_id: str | None, sha256: str | None) -> Resolved:
        return client.resolve(source, version_id, sha256=sha256, timeout_s=timeout_s, job="lock")

    report = LockReport(str(path), check, [])
    new_items: list[Any] = list(items)
    for i, spec in enumerate(specs):
        parsed = parse_source(spec.source)
        locked = {"version_id": spec.version_id, "sha256": spec.sha256}
        if isinstance(parsed, LocalSource):
            report.entries.append(LockEntry(i, spec.target, spec.source, "skipped", locked))
            continue
        alias = isinstance(parsed, AssetAlias)
        entry = _check_one(i, spec, alias, resolve) if check else None
        if entry is None:
            entry, pins = _lock_one(i, spec, alias, upgrade, resolve)
            if pins:
                new_items[i] = _with_pins(items[i], pins)
        report.entries.append(entry)
    if check or report.problems:
        return report
    # an updated key keeps its place: "assets" stays where the file had it
    data = {**data, "assets": new_items} if isinstance(data, dict) else new_items
    out = dumps_like(text, data)
    if out != text:
        _write_in_place(Path(path), out)
        report.written = True
    return report


def _check_one(i: int, spec: AssetSpec, alias: bool, resolve: Resolve) -> LockEntry:
    locked = {"version_id": spec.version_id, "sha256": spec.sha256}
    try:
        res = resolve(spec.source, None, None)  # what the object is now, not what was pinned
    except AssetError as exc:
        err = {"code": exc.code, "message": exc.message}
        return LockEntry(i, spec.target, spec.source, "error", locked, error=err)
    current: dict[str, str | None] = {"version_id": res.version_id, "sha256": res.sha256}
    if spec.sha256 is None:
        status: Status = "unlocked"
    elif spec.sha256 != res.sha256 or (
        not alias and spec.version_id is not None and spec.version_id != res.version_id
    ):
        status = "drifted"
    else:
        status = "current"
    return LockEntry(i, spec.target, spec.source, status, locked, current)


def _lock_one(
    i: int, spec: AssetSpec, alias: bool, upgrade: bool, resolve: Resolve
) -> tuple[LockEntry, dict[str, str]]:
    locked = {"version_id": spec.version_id, "sha256": spec.sha256}
    try:
        if upgrade:
            res = resolve(spec.source, None, None)
        else:  # an existing pin stays: a pinned version is only verified and completed
            res = resolve(spec.source, spec.version_id, spec.sha256)
    except AssetError as exc:
        err = {"code": exc.code, "message": exc.message}
        return LockEntry(i, spec.target, spec.source, "error", locked, error=err), {}
    pins = _pins_of(res, alias)
    current: dict[str, str | None] = dict(pins)
    same = all(locked.get(k) == v for k, v in pins.items())
    status: Status = "unchanged" if same else "locked"
    return LockEntry(i, spec.target, spec.source, status, locked, current), pins


def _write_in_place(path: Path, text: str) -> None:
    """Replace the file atomically, keeping its mode."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
