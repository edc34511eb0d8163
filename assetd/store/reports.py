"""What the store's maintenance passes report: eviction, recovery, verify."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EvictionReport:
    """What one eviction pass did; ``full`` means the limits still are not met."""

    freed_bytes: int = 0
    removed_entries: int = 0
    removed_blobs: int = 0
    bytes_after: int = 0
    free_after: int = 0
    full: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What start-up recovery found and mended."""

    removed_temps: int = 0
    dropped_rows: int = 0
    quarantined: int = 0
    deleted_blobs: int = 0
    entries: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """``assetd verify``: blobs re-hashed, and those whose bytes did not match their name."""

    checked: int = 0
    bytes: int = 0
    mismatched: list[str] = field(default_factory=list)
    dropped_rows: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
