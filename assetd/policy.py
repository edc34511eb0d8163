"""What the daemon may fetch: bucket and key-prefix allowlists, a size cap.

Evaluated before any network call. Prefixes are plain string matches, like
IAM resource ARNs, applied in every allowed bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

from assetd.errors import NotAllowed, TooLarge
from assetd.uri import S3Source

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    allowed_buckets: frozenset[str] = frozenset()
    allowed_prefixes: tuple[str, ...] = ()
    max_object_bytes: int = 1 << 30

    def check_source(self, source: S3Source) -> None:
        """Raise NotAllowed unless bucket and key are inside the allowlists."""
        if self.allowed_buckets and source.bucket not in self.allowed_buckets:
            raise NotAllowed(f"bucket '{source.bucket}' is not in the allowlist")
        if self.allowed_prefixes and not source.key.startswith(self.allowed_prefixes):
            raise NotAllowed(f"key of bucket '{source.bucket}' is outside the allowed prefixes")

    def check_size(self, size: int) -> None:
        """Raise TooLarge if an object of ``size`` bytes is over the cap."""
        if size > self.max_object_bytes:
            raise TooLarge(
                f"object is {size} bytes, over the limit of {self.max_object_bytes} bytes"
            )
