"""Putting bytes into a Store the way a finished download does."""

from __future__ import annotations

import hashlib
from pathlib import Path

from assetd.store import Entry, Store


def commit_bytes(
    store: Store,
    data: bytes,
    *,
    bucket: str = "bucket",
    key: str = "k",
    etag: str | None = None,
    version_id: str | None = None,
    requested_version: str | None = None,
    pinned_until: float = 0.0,
) -> tuple[Entry, Path]:
    """Stage ``data`` and commit it under (bucket, key); etag defaults to '"<key>"'."""
    with store.staged() as st:
        st.write(memoryview(data))
        return store.commit(
            st,
            bucket=bucket,
            key=key,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            etag=etag or f'"{key}"',
            version_id=version_id,
            requested_version=requested_version,
            pinned_until=pinned_until,
        )
