"""The grader's side of assetd: asset specs, pre-flight resolution, placement.

A grader reads the ``assets`` of an assignment's setup config, resolves
every one before any setup command runs (all or nothing), then places them
in the sandbox:

- read-only bind mounts, as Docker mount specs or bubblewrap arguments;
- a private copy for ``read_only: false`` (the cache blob itself is never
  mounted writable);
- a streamed tar for sandboxes created ahead of time (no argv size limit).

``AssetdBytesProvider`` keeps graders built around
``get_asset(source, target, read_only) -> bytes | None`` working unchanged.

Nothing here talks to S3 or holds a credential: ``s3://`` sources go to the
daemon, local sources are read under a configured root. A blob found
missing or changed when it is placed is a retryable error (``unavailable``
or ``integrity``), never the student's failure.

This module runs inside the grader's process, so it logs through the stdlib
logger ``assetd.grader`` and never prints: the host application decides
where those records go (see :mod:`assetd.log`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from assetd.client import AssetdClientPool
from assetd.errors import (
    AssetError,
    BadRequest,
    ConfigError,
    ContentMismatch,
    IntegrityError,
    MalformedURI,
    NotAllowed,
    NotFound,
    TooLarge,
    Unavailable,
)
from assetd.manifest import Manifest, ManifestEntry
from assetd.pins import check_sha256
from assetd.protocol import Resolved
from assetd.uri import AssetAlias, LocalSource, parse_source

__all__ = [
    "AssetSourceResolver",
    "AssetSpec",
    "AssetdBytesProvider",
    "DaemonProvider",
    "LocalProvider",
    "PlacedAsset",
    "PreflightError",
    "PreflightFailure",
    "ResolvedAsset",
    "ResolvedAssets",
    "bwrap_args",
    "check_assets",
    "docker_mounts",
    "parse_assets",
    "place_copies",
    "tar_stream",
]

log = logging.getLogger("assetd.grader")
_FIELDS = frozenset({"source", "target", "read_only", "version_id", "sha256"})
_FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode Cc, as for sources


@dataclass(frozen=True, slots=True)
class AssetSpec:
    """One entry of ``assets``: where a file comes from and where it goes."""

    source: str
    target: str
    read_only: bool = True
    version_id: str | None = None
    sha256: str | None = None  # content pin: these bytes or content_mismatch

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> AssetSpec:
        """Validate one entry; raise an AssetError whose message names the field."""
        if not isinstance(data, Mapping):
            raise BadRequest("each asset must be an object with source and target")
        unknown = sorted(set(data) - _FIELDS)
        if unknown:
            raise BadRequest(f"asset has unknown field '{unknown[0]}'")
        source = data.get("source")
        if source is not None and not isinstance(source, str):
            raise BadRequest("asset source must be a string")
        if not source:
            raise MalformedURI("asset source is empty")
        parse_source(source)
        target = data.get("target")
        if not isinstance(target, str):
            raise BadRequest("asset target must be a string")
        _check_target(target)
        read_only = data.get("read_only", True)
        if not isinstance(read_only, bool):
            raise BadRequest("asset read_only must be true or false")
        version_id = data.get("version_id")
        if version_id is not None and (not isinstance(version_id, str) or not version_id):
            raise BadRequest("asset version_id must be a non-empty string")
        if version_id is not None and not _encodable(version_id):
            raise BadRequest("asset version_id is not valid UTF-8 text")
        pin = check_sha256(data.get("sha256"), "asset sha256")
        return AssetSpec(source, target, read_only, version_id, pin)


def _encodable(text: str) -> bool:
    # lone surrogates (from JSON "\udc80" escapes or surrogateescape) pass str checks
    # but cannot reach argv, a tar header or the wire: refuse them here, once
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_target(target: str) -> None:
    if not _encodable(target):
        raise BadRequest("asset target is not valid UTF-8 text (it contains a lone surrogate)")
    if not target.startswith("/"):
        raise BadRequest(f"asset target '{target}' must be an absolute path")
    if _CONTROL.search(target):
        raise BadRequest("asset target contains control characters")
    if ".." in target.split("/"):
        raise BadRequest(f"asset target '{target}' must not contain '..'")
    if posixpath.normpath(target) != target or target.startswith("//"):
        raise BadRequest(f"asset target '{target}' is not a normalised path")
    if target == "/":
        raise BadRequest("asset target cannot be '/'")
    for root in _FORBIDDEN_ROOTS:
        if target == root or target.startswith(root + "/"):
            raise BadRequest(f"asset target '{target}' is under {root}")


def parse_assets(config: Mapping[str, Any] | Sequence[Any]) -> list[AssetSpec]:
    """The validated ``assets`` of a setup config (or a bare list of entries)."""
    entries = config.get("assets", []) if isinstance(config, Mapping) else config
    if not isinstance(entries, list):
        raise BadRequest("'assets' must be a list")
    specs = [AssetSpec.from_dict(entry) for entry in entries]
    seen: set[str] = set()
    for spec in specs:
        if spec.target in seen:
            raise BadRequest(f"two assets have the same target '{spec.target}'")
        seen.add(spec.target)
    return specs


# --- resolution ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvedAsset:
    """A spec and the host file that holds its bytes (a cache blob or a local file)."""

    spec: AssetSpec
    path: Path
    size: int
    sha256: str | None = None
    cache: str | None = None
    # for the manifest; not part of equality, which stays "same file, same bytes"
    etag: str | None = field(default=None, compare=False)
    version_id: str | None = field(default=None, compare=False)
    resolved_source: str | None = field(default=None, compare=False)

    def manifest_entry(self) -> ManifestEntry:
        local = self.cache is None
        return ManifestEntry(
            target=self.spec.target,
            source=self.spec.source,
            resolved_source=self.resolved_source or self.spec.source,
            version_id=self.version_id,
            etag=self.etag,
            sha256=self.sha256,
            size=self.size,
            cache="local" if local else self.cache,
        )


class ResolvedAssets(list[ResolvedAsset]):
    """What ``resolve_assets`` returns: the assets in order, plus the job's manifest."""

    def __init__(self, assets: Iterable[ResolvedAsset], manifest: Manifest) -> None:
        super().__init__(assets)
        self.manifest = manifest


class Provider(Protocol):
    def resolve(self, spec: AssetSpec, *, job: str | None = None) -> ResolvedAsset: ...


class LocalProvider:
    """Relative paths under a root; the real path must stay inside it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.realpath(root))

    def resolve(self, spec: AssetSpec, *, job: str | None = None) -> ResolvedAsset:
        parsed = parse_source(spec.source)
        assert isinstance(parsed, LocalSource)
        real = Path(os.path.realpath(self.root / parsed.path))
        if real != self.root and self.root not in real.parents:
            raise NotAllowed("local source resolves outside the local root")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise NotFound(f"local source '{spec.source}' does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"local source '{spec.source}' is not a regular file")
        if spec.sha256 is None:
            return ResolvedAsset(spec, real, st.st_size)
        digest = _file_sha256(real)  # a pinned local file is checked like a daemon answer
        if digest != spec.sha256:
            raise ContentMismatch.for_digests(spec.sha256, digest)
        return ResolvedAsset(spec, real, st.st_size, digest)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Resolves(Protocol):
    """What DaemonProvider needs of a client: AssetdClient or AssetdClientPool."""

    def resolve(
        self,
        source: str,
        version_id: str | None = None,
        *,
        timeout_s: float | None = None,
        job: str | None = None,
        sha256: str | None = None,
    ) -> Resolved: ...


class DaemonProvider:
    """``s3://`` sources, resolved by the assetd daemon."""

    def __init__(self, client: Resolves, *, timeout_s: float | None = None) -> None:
        self.client = client
        self.timeout_s = timeout_s

    def resolve(self, spec: AssetSpec, *, job: str | None = None) -> ResolvedAsset:
        res = self.client.resolve(
            spec.source, spec.version_id, timeout_s=self.timeout_s, job=job, sha256=spec.sha256
        )
        if spec.sha256 is not None and res.sha256 != spec.sha256:
            # a daemon that ignored the pin (older than v2) must not hand us other bytes
            raise ContentMismatch.for_digests(spec.sha256, res.sha256)
        return ResolvedAsset(
            spec,
            res.path,
            res.size,
            res.sha256,
            res.cache,
            etag=res.etag,
            version_id=res.version_id,
            resolved_source=res.resolved_source,
        )


@dataclass(frozen=True, slots=True)
class PreflightFailure:
    source: str
    target: str
    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {
            "source": self.source,
            "target": self.target,
            "code": self.code,
            "message": self.message,
        }


class PreflightError(Exception):
    """Some assets could not be resolved; nothing was placed. One line per asset.

    ``manifest`` has every asset of the job: what resolved, and each failure.
    """

    def __init__(
        self, failures: Sequence[PreflightFailure], manifest: Manifest | None = None
    ) -> None:
        self.failures = list(failures)
        self.manifest = manifest or Manifest.of(
            ManifestEntry(f.target, f.source, error={"code": f.code, "message": f.message})
            for f in self.failures
        )
        lines = [f"{f.target} <- {f.source}: {f.code}: {f.message}" for f in self.failures]
        super().__init__("assets failed pre-flight:\n" + "\n".join(lines))

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.failures]

    def to_dict(self) -> dict[str, Any]:
        return {"failures": [f.to_dict() for f in self.failures]}


class AssetSourceResolver:
    """Picks a provider by scheme and resolves a whole asset list pre-flight.

    A source without a scheme is a local file under ``local_root``, or, with
    ``legacy_bucket``, a key in that bucket (``data/x.csv`` is read as
    ``s3://<legacy_bucket>/data/x.csv``), for setup configs written for
    providers that took the bucket from their own settings. The two options
    exclude each other: a bare source must mean one thing.
    """

    def __init__(
        self,
        *,
        client: Resolves | None = None,
        local_root: str | os.PathLike[str] | None = None,
        legacy_bucket: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        if local_root is not None and legacy_bucket is not None:
            raise ConfigError(
                "legacy_bucket and local_root exclude each other: a source without a scheme"
                " is either a key in legacy_bucket or a file under local_root"
            )
        if legacy_bucket is not None:
            try:
                parse_source(f"s3://{legacy_bucket}/k")
            except AssetError as exc:
                raise ConfigError(f"legacy_bucket: {exc.message}") from None
        self.daemon = DaemonProvider(client, timeout_s=timeout_s) if client else None
        self.local = LocalProvider(local_root) if local_root is not None else None
        self.legacy_bucket = legacy_bucket

    def _routed(self, spec: AssetSpec) -> tuple[AssetSpec, Provider]:
        parsed = parse_source(spec.source)
        if isinstance(parsed, LocalSource):
            if self.legacy_bucket is not None:
                mapped = f"s3://{self.legacy_bucket}/{spec.source}"
                parse_source(mapped)  # S3's key rules, e.g. its length limit
                spec = dataclasses.replace(spec, source=mapped)
            elif self.local is None:
                raise NotAllowed(
                    f"source '{spec.source}' has no scheme; write it as s3://<bucket>/{spec.source},"
                    " or give the grader legacy_bucket (bare keys are S3 keys in that bucket)"
                    " or local_root (bare paths are local files)"
                )
            else:
                return spec, self.local
        if self.daemon is None:
            scheme = "asset" if isinstance(parsed, AssetAlias) else "s3"
            raise NotAllowed(f"{scheme} sources need the assetd daemon, which is not configured")
        return spec, self.daemon

    def provider_for(self, spec: AssetSpec) -> Provider:
        """The provider that resolves ``spec`` (the daemon, or the local root)."""
        return self._routed(spec)[1]

    def resolve(self, spec: AssetSpec, *, job: str | None = None) -> ResolvedAsset:
        """One asset; raises its AssetError. The result keeps ``spec`` as given."""
        routed, provider = self._routed(spec)
        resolved = provider.resolve(routed, job=job)
        return dataclasses.replace(resolved, spec=spec) if routed is not spec else resolved

    def resolve_assets(
        self, specs: Iterable[AssetSpec], *, job: str | None = None
    ) -> ResolvedAssets:
        """Resolve every asset, or raise PreflightError naming each one that failed.

        Either way the job's manifest comes along: ``.manifest`` on the
        returned list, or on the PreflightError.
        """
        resolved: list[ResolvedAsset] = []
        failures: list[PreflightFailure] = []
        entries: list[ManifestEntry] = []
        for spec in specs:
            try:
                asset = self.resolve(spec, job=job)
            except AssetError as exc:
                failure = PreflightFailure(spec.source, spec.target, exc.code, exc.message)
                failures.append(failure)
                error = {"code": exc.code, "message": exc.message}
                entries.append(ManifestEntry(spec.target, spec.source, error=error))
            else:
                resolved.append(asset)
                entries.append(asset.manifest_entry())
        manifest = Manifest.of(entries, job)
        if failures:
            summary = "; ".join(f"{f.target}: {f.code}" for f in failures)
            log.warning(
                "pre-flight failed (job %s): %s",
                job,
                summary,
                extra={"fields": {"job": job, "failures": [f.to_dict() for f in failures]}},
            )
            raise PreflightError(failures, manifest)
        return ResolvedAssets(resolved, manifest)


def check_assets(assets: Iterable[ResolvedAsset], *, verify_sha256: bool = False) -> None:
    """Check, right before placement, that each resolved file is still what was resolved.

    A file that is gone (evicted, removed by maintenance) raises
    ``Unavailable``; one that is no longer a regular file of the resolved size
    (or, with ``verify_sha256``, of the resolved content) raises
    ``IntegrityError``. Both are retryable: an infrastructure fault, never a
    student's failure. Messages name the target, never the host path.
    """
    for asset in assets:
        target = asset.spec.target
        try:
            st = os.stat(asset.path)
        except FileNotFoundError:
            raise Unavailable(
                f"the cached file for '{target}' disappeared before it was placed; retry the job",
                detail=str(asset.path),
            ) from None
        except OSError as exc:
            raise Unavailable(
                f"the cached file for '{target}' cannot be read; retry the job",
                detail=f"{asset.path}: {exc}",
            ) from None
        if not stat.S_ISREG(st.st_mode) or st.st_size != asset.size:
            raise IntegrityError(
                f"the cached file for '{target}' changed after it was resolved; retry the job",
                detail=f"{asset.path}: size {st.st_size}, resolved {asset.size}",
            )
        if verify_sha256 and asset.sha256 is not None:
            try:
                digest = _file_sha256(asset.path)
            except OSError as exc:
                raise Unavailable(
                    f"the cached file for '{target}' cannot be read; retry the job",
                    detail=f"{asset.path}: {exc}",
                ) from None
            if digest != asset.sha256:
                raise IntegrityError(
                    f"the cached file for '{target}' changed after it was resolved; retry the job",
                    detail=f"{asset.path}: sha256 {digest}, resolved {asset.sha256}",
                )


# --- placement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacedAsset:
    """What a sandbox mounts at ``target``: the blob read-only, or a private copy."""

    host_path: Path
    target: str
    writable: bool


def _unreadable(asset: ResolvedAsset, exc: OSError) -> AssetError:
    """The error for a resolved blob that cannot be read: gone or changed if so, else retry."""
    check_assets([asset])  # raises the coded error when the blob is gone or changed
    return Unavailable(
        f"the cached file for '{asset.spec.target}' cannot be read; retry the job",
        detail=f"{asset.path}: {exc}",
    )


def place_copies(
    assets: Iterable[ResolvedAsset], workdir: str | os.PathLike[str]
) -> list[PlacedAsset]:
    """Read-only assets stay the cache blob; writable ones get a private copy in ``workdir``."""
    placed = []
    for asset in assets:
        if asset.spec.read_only:
            placed.append(PlacedAsset(asset.path, asset.spec.target, writable=False))
            continue
        fd, name = tempfile.mkstemp(prefix="asset-", dir=workdir)
        with os.fdopen(fd, "wb") as out:
            try:
                src = open(asset.path, "rb")  # noqa: SIM115 - closed just below
            except OSError as exc:
                raise _unreadable(asset, exc) from None
            with src:
                shutil.copyfileobj(src, out, 1 << 20)
        if os.path.getsize(name) != asset.size:
            raise IntegrityError(
                f"the cached file for '{asset.spec.target}' changed while it was copied;"
                " retry the job"
            )
        os.chmod(name, 0o644)
        placed.append(PlacedAsset(Path(name), asset.spec.target, writable=True))
    return placed


def bwrap_args(placed: Iterable[PlacedAsset]) -> list[str]:
    """bubblewrap arguments that mount each asset at its target."""
    args: list[str] = []
    for p in placed:
        args += ["--bind" if p.writable else "--ro-bind", str(p.host_path), p.target]
    return args


def docker_mounts(placed: Iterable[PlacedAsset]) -> list[dict[str, Any]]:
    """Mount specs for Docker's API (``HostConfig.Mounts``).

    The docker SDK spells them ``Mount(target=..., source=..., type="bind",
    read_only=...)``; these dicts are what it sends on the wire.
    """
    return [
        {
            "Type": "bind",
            "Source": str(p.host_path),
            "Target": p.target,
            "ReadOnly": not p.writable,
        }
        for p in placed
    ]


def tar_stream(assets: Iterable[ResolvedAsset], *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A tar archive of the assets at their targets (paths relative to /), streamed.

    For sandboxes that already exist (pre-warmed pools): feed it to
    ``tar -x -C /`` inside the sandbox; ``assetd.grader_docker.inject`` does
    that for Docker. Not to ``put_archive``: it writes below a tmpfs mounted
    over the target's directory, where the sandbox never sees the file.
    Read-only assets get mode 0444, writable ones 0644. Written by hand
    rather than through ``tarfile``, which would buffer a whole member:
    memory stays at one chunk whatever the asset sizes.
    """
    for asset in assets:
        with open(asset.path, "rb") as src:
            st = os.fstat(src.fileno())
            info = tarfile.TarInfo(asset.spec.target.lstrip("/"))
            info.size = st.st_size
            info.mode = 0o444 if asset.spec.read_only else 0o644
            info.mtime = int(st.st_mtime)
            yield info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8")
            left = st.st_size
            while left:  # never an empty chunk: a chunked HTTP body would end there
                chunk = src.read(min(chunk_size, left))
                if not chunk:
                    raise NotFound(f"asset for '{asset.spec.target}' shrank while being sent")
                yield chunk
                left -= len(chunk)
        if st.st_size % tarfile.BLOCKSIZE:
            yield b"\0" * (-st.st_size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end-of-archive marker


# --- bytes provider ----------------------------------------------------------------------


class AssetdBytesProvider:
    """``get_asset(source, target, read_only) -> bytes | None``, backed by assetd.

    For graders that pass file contents around (the webtech-network
    autograder's provider interface). Two ways to fail:

    - ``raise_errors=False`` (the default, for callers written against that
      interface): a failure returns ``None``; the calling thread's
      ``last_error`` holds the AssetError with its code;
    - ``raise_errors=True``: the AssetError itself is raised (a
      ``RuntimeError``, so ``except RuntimeError`` still catches it), with
      ``str(exc)`` reading ``TARGET: CODE: MESSAGE``.

    A zero-byte asset returns ``b""``: test the result with ``is None``.
    Safe to share between threads: without a ``client`` the provider keeps a
    pool of connections (one per concurrent call), which ``close()`` (or
    leaving a ``with`` block) closes. A ``client`` passed in is the caller's
    to close.
    """

    def __init__(
        self,
        client: Resolves | None = None,
        *,
        socket_path: str | None = None,
        local_root: str | os.PathLike[str] | None = None,
        legacy_bucket: str | None = None,
        max_bytes: int = 256 << 20,
        timeout_s: float | None = None,
        raise_errors: bool = False,
    ) -> None:
        if client is not None and socket_path is not None:
            raise ConfigError("give AssetdBytesProvider a client or a socket_path, not both")
        self._pool = AssetdClientPool(socket_path) if client is None else None
        self.resolver = AssetSourceResolver(
            client=client or self._pool,
            local_root=local_root,
            legacy_bucket=legacy_bucket,
            timeout_s=timeout_s,
        )
        self.max_bytes = max_bytes
        self.raise_errors = raise_errors
        self._local = threading.local()

    @property
    def last_error(self) -> AssetError | None:
        """The calling thread's last failure (None after a success): never another thread's."""
        error: AssetError | None = getattr(self._local, "last_error", None)
        return error

    def close(self) -> None:
        """Close the connections this provider opened (not a client passed in)."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> AssetdBytesProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_asset(
        self,
        source: str,
        target: str,
        read_only: bool = True,
        *,
        version_id: str | None = None,
        job: str | None = None,
    ) -> bytes | None:
        """The asset's bytes; on failure None (or the AssetError, with ``raise_errors``)."""
        self._local.last_error = None
        try:
            try:
                return self._fetch(source, target, read_only, version_id, job)
            except OSError as exc:  # e.g. a local file this user may not read: never a traceback
                raise Unavailable(
                    f"the file for '{target}' cannot be read on this grader", detail=str(exc)
                ) from None
        except AssetError as exc:
            self._local.last_error = exc
            log.warning(
                "get_asset %s <- %s failed: %s: %s",
                target,
                source,
                exc.code,
                exc.message,
                extra={"fields": {"source": source, "target": target, "code": exc.code}},
            )
            if self.raise_errors:
                exc.args = (f"{target}: {exc.code}: {exc.message}",)
                raise
            return None

    def _fetch(
        self,
        source: str,
        target: str,
        read_only: bool,
        version_id: str | None,
        job: str | None,
    ) -> bytes:
        entry: dict[str, Any] = {"source": source, "target": target, "read_only": read_only}
        if version_id is not None:
            entry["version_id"] = version_id
        asset = self.resolver.resolve(AssetSpec.from_dict(entry), job=job)
        if asset.size > self.max_bytes:
            raise TooLarge("asset is too large to hand over as bytes; mount it instead")
        try:
            with open(asset.path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except OSError as exc:
            raise _unreadable(asset, exc) from None
        if len(data) != asset.size or (
            asset.sha256 is not None and hashlib.sha256(data).hexdigest() != asset.sha256
        ):
            raise IntegrityError(
                f"the cached file for '{target}' changed after it was resolved; retry the job"
            )
        return data
