"""Content pins: a ``sha256`` that names the exact bytes a request must get.

DESIGN.md "v2 additions": 64 lowercase hex characters; ``None`` is no pin;
anything else is ``bad_request``. Shared by the daemon (requests, catalog
entries) and the grader (asset specs), so both sides refuse the same values.
"""

from __future__ import annotations

import re

from assetd.errors import BadRequest

__all__ = ["check_sha256", "is_sha256"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def check_sha256(value: object, what: str = "sha256") -> str | None:
    """The pin, or None when absent; BadRequest naming ``what`` otherwise."""
    if value is None:
        return None
    if not is_sha256(value):
        raise BadRequest(f"{what} must be 64 lowercase hex characters")
    assert isinstance(value, str)
    return value
