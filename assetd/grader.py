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
daemon, local sources are read under a configured root.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from assetd.client import AssetdClient
from assetd.errors import (
    AssetError,
    BadRequest,
    ContentMismatch,
    MalformedURI,
    NotAllowed,
    NotFound,
    TooLarge,
)
from assetd.log import get_logger
from assetd.manifest import Manifest, ManifestEntry
from assetd.pins import check_sha256
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
    "docker_mounts",
    "parse_assets",
    "place_copies",
    "tar_stream",
]

log = get_logger("assetd.grader")
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
        pin = check_sha256(data.get("sha256"), "asset sha256")
        return AssetSpec(source, target, read_only, version_id, pin)


def _check_target(target: str) -> None:
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


class DaemonProvider:
    """``s3://`` sources, resolved by the assetd daemon."""

    def __init__(self, client: AssetdClient, *, timeout_s: float | None = None) -> None:
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
    """Picks a provider by scheme and resolves a whole asset list pre-flight."""

    def __init__(
        self,
        *,
        client: AssetdClient | None = None,
        local_root: str | os.PathLike[str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.daemon = DaemonProvider(client, timeout_s=timeout_s) if client else None
        self.local = LocalProvider(local_root) if local_root is not None else None

    def provider_for(self, spec: AssetSpec) -> Provider:
        parsed = parse_source(spec.source)
        if isinstance(parsed, LocalSource):
            if self.local is None:
                raise NotAllowed("local sources are not enabled on this grader")
            return self.local
        if self.daemon is None:
            scheme = "asset" if isinstance(parsed, AssetAlias) else "s3"
            raise NotAllowed(f"{scheme} sources need the assetd daemon, which is not configured")
        return self.daemon

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
                asset = self.provider_for(spec).resolve(spec, job=job)
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
            log.warning("pre-flight failed", job=job, failures=[f.to_dict() for f in failures])
            raise PreflightError(failures, manifest)
        return ResolvedAssets(resolved, manifest)


# --- placement -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlacedAsset:
    """What a sandbox mounts at ``target``: the blob read-only, or a private copy."""

    host_path: Path
    target: str
    writable: bool


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
        with os.fdopen(fd, "wb") as out, open(asset.path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
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
    ``container.put_archive("/", tar_stream(...))`` or to ``tar -x -C /``.
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
    autograder's provider interface). Failures return None, as that
    interface expects; ``last_error`` keeps the stable code and message.
    """

    def __init__(
        self,
        client: AssetdClient | None = None,
        *,
        local_root: str | os.PathLike[str] | None = None,
        max_bytes: int = 256 << 20,
    ) -> None:
        self.resolver = AssetSourceResolver(client=client or AssetdClient(), local_root=local_root)
        self.max_bytes = max_bytes
        self.last_error: AssetError | None = None

    def get_asset(self, source: str, target: str, read_only: bool = True) -> bytes | None:
        self.last_error = None
        try:
            spec = AssetSpec.from_dict({"source": source, "target": target, "read_only": read_only})
            asset = self.resolver.provider_for(spec).resolve(spec)
            if asset.size > self.max_bytes:
                raise TooLarge("asset is too large to hand over as bytes; mount it instead")
            with open(asset.path, "rb") as f:
                return f.read()
        except AssetError as exc:
            self.last_error = exc
            log.warning("get_asset failed", source=source, code=exc.code, message=exc.message)
            return None
        except OSError as exc:
            with contextlib.suppress(Exception):
                log.warning("get_asset failed", source=source, error=str(exc))
            self.last_error = NotFound("asset file could not be read")
            return None
