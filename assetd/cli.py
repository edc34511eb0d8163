"""The ``assetd`` command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, NoReturn

import click

from assetd import __version__
from assetd.client import AssetdClient, DaemonUnreachable
from assetd.config import Config, load_config
from assetd.errors import AssetError, ConfigError, UnsupportedScheme

__all__ = ["main"]


def _load(config_path: str | None) -> Config:
    from assetd import log

    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        _fail(f"assetd: invalid config: {exc}", 2)
    log.configure(cfg.log.format, cfg.log.level)  # stderr: stdout is the command's answer
    return cfg


def _fail(line: str, code: int) -> NoReturn:
    click.echo(line, err=True)
    sys.exit(code)


def _row(label: str, value: object) -> None:
    click.echo(f"{label + ':':<13}{value}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="assetd")
def cli() -> None:
    """Cache S3 assets on a grading host and hand out local paths."""


class _Report:
    """What ``check`` found, printed as rows or as one JSON object."""

    def __init__(self, source: str, as_json: bool) -> None:
        self.data: dict[str, Any] = {"source": source}
        self.as_json = as_json

    def add(self, field: str, value: Any, row: str | None = None) -> None:
        self.data[field] = value
        if not self.as_json and row is not None:
            _row(field, row)

    def finish(self, err: AssetError | None) -> NoReturn:
        if err is not None:
            self.data["error"] = err.to_dict()
        if self.as_json:
            click.echo(json.dumps(self.data))
        elif err is not None:
            _row("error", f"{err.code}: {err.message}")
        sys.exit(0 if err is None else 1)


def _check_catalog(cfg: Config) -> Any:
    """The catalog ``check`` needs for an asset:// source."""
    from assetd.catalog import catalog_path, load_catalog

    path = catalog_path(cfg.catalog.file, cfg.path)
    if path is None:
        raise UnsupportedScheme("asset:// sources need a catalog, and none is configured")
    try:
        return load_catalog(path)
    except ConfigError as exc:
        _fail(f"assetd: invalid catalog: {exc}", 2)


def _check_store(stack: contextlib.ExitStack, report: _Report, cfg: Config) -> tuple[Config, Any]:
    """The cache ``check`` fills: the configured one, or a scratch dir if a daemon owns it."""
    from assetd.store import CacheLocked, Store

    try:
        return cfg, Store(cfg.cache.dir, lock=True)
    except CacheLocked:
        # the daemon owns the cache: fetch into a private one, thrown away after
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="assetd-check-"))
        report.add("cache", "scratch", "a scratch dir: the daemon owns the cache")
        return replace(cfg, cache=replace(cfg.cache, dir=scratch)), Store(scratch, lock=True)


def _check(report: _Report, cfg: Config, source: str, version_id: str | None) -> None:
    from assetd.fetcher.s3 import S3Fetcher
    from assetd.service import AssetService
    from assetd.uri import AssetAlias, parse_remote

    parsed_any = parse_remote(source)
    catalog = None
    if isinstance(parsed_any, AssetAlias):
        catalog = _check_catalog(cfg)
        entry = catalog.get(parsed_any.name)
        report.add("catalog", entry.to_dict(), f"{catalog.path}: -> {entry.source}")
        parsed, version_id = entry.source, version_id or entry.version_id
    else:
        parsed = parsed_any
    report.add(
        "parsed",
        {"bucket": parsed.bucket, "key": parsed.key, "version_id": version_id},
        f"bucket={parsed.bucket} key={parsed.key} version_id={version_id}",
    )
    report.data["policy"] = "refused"
    cfg.policy().check_source(parsed)
    buckets = ", ".join(cfg.s3.allowed_buckets) or "any (IAM is the only boundary)"
    prefixes = ", ".join(cfg.s3.allowed_prefixes) or "any"
    report.add("policy", "allowed", f"allowed (buckets: {buckets}; prefixes: {prefixes})")
    report.add("limit", cfg.s3.max_object_bytes, f"{cfg.s3.max_object_bytes} bytes")
    fetcher = S3Fetcher(cfg.s3)
    creds = fetcher.credential_source()
    report.add("credentials", creds, creds or "none found in boto3's default chain")
    endpoint = str(_redact(cfg.s3.endpoint_url)) if cfg.s3.endpoint_url else "AWS default"
    report.add("endpoint", endpoint, endpoint)
    meta = fetcher.head(
        parsed.bucket, parsed.key, version_id, deadline=time.monotonic() + cfg.s3.deadline_s
    )
    checks = "+".join(
        ["size"] + ["md5"] * (meta.md5 is not None) + ["sha256"] * (meta.sha256 is not None)
    )
    report.add(
        "head",
        {"size": meta.size, "etag": meta.etag, "version_id": meta.version_id, "verify": checks},
        f"size={meta.size} etag={meta.etag} version_id={meta.version_id} verify={checks}",
    )
    with contextlib.ExitStack() as stack:
        cfg, store = _check_store(stack, report, cfg)
        service = AssetService(cfg, fetcher, store)
        service.set_catalog(catalog)
        try:
            started = time.perf_counter()
            resolved = service.resolve(source, version_id)
            took = time.perf_counter() - started
        finally:
            service.close()
            store.close()
    report.add("result", resolved.to_dict() | {"seconds": round(took, 4)})
    if not report.as_json:
        _row("fetch", f"{resolved.cache} in {took:.3f}s")
        _row("path", resolved.path)
        _row("sha256", resolved.sha256)


@cli.command()
@click.argument("source")
@click.option("--version-id", default=None, help="Fetch this object version.")
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def check(source: str, version_id: str | None, config_path: str | None, as_json: bool) -> None:
    """Diagnose one SOURCE in-process: parse, policy, credentials, HEAD, fetch."""
    cfg = _load(config_path)
    report = _Report(source, as_json)
    try:
        _check(report, cfg, source, version_id)
    except AssetError as exc:
        report.finish(exc)
    report.finish(None)


def _client(socket_path: str | None, timeout: float) -> AssetdClient:
    return AssetdClient(socket_path, timeout=timeout)


def _unreachable(exc: DaemonUnreachable) -> NoReturn:
    _fail(exc.for_operator(), 3)


_SECONDS = click.FloatRange(0, min_open=True)  # a bad --timeout is a usage error (exit 2)
_socket_option = click.option(
    "--socket",
    "socket_path",
    default=None,
    help="Daemon socket (default: $ASSETD_SOCKET or /run/assetd/assetd.sock).",
)


@cli.command()
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option(
    "--grace", default=10.0, show_default=True, help="Seconds in-flight work gets at stop."
)
def serve(config_path: str | None, grace: float) -> None:
    """Run the daemon in the foreground (systemd: Type=notify)."""
    from assetd import log
    from assetd.server import build_daemon
    from assetd.store import CacheLocked

    cfg = _load(config_path)
    log.configure(cfg.log.format, cfg.log.level)
    try:
        daemon = build_daemon(cfg, grace_s=grace)
    except CacheLocked as exc:
        _fail(f"assetd: cannot start: {exc.strerror}", EXIT_CACHE_BUSY)
    except (ConfigError, AssetError) as exc:
        _fail(f"assetd: cannot start: {exc}", 2)
    try:
        code = daemon.run()
    except ConfigError as exc:
        _fail(f"assetd: cannot start: {exc}", 2)
    except OSError as exc:
        _fail(f"assetd: cannot start: {exc}", 1)
    sys.exit(code)


@cli.command()
@click.argument("source")
@click.option("--version-id", default=None, help="Resolve this object version.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Deadline in seconds.",
)
@click.option("--job", default=None, help="Caller label logged with the result.")
@click.option("--sha256", default=None, help="Content pin: these bytes or content_mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole answer as JSON.")
@_socket_option
def get(
    source: str,
    version_id: str | None,
    timeout_s: float | None,
    job: str | None,
    sha256: str | None,
    as_json: bool,
    socket_path: str | None,
) -> None:
    """Ask the daemon for SOURCE and print its local path."""
    with _client(socket_path, timeout=(timeout_s or 300) + 5) as client:
        try:
            res = client.resolve(source, version_id, timeout_s=timeout_s, job=job, sha256=sha256)
        except DaemonUnreachable as exc:
            _unreachable(exc)
        except AssetError as exc:
            if as_json:
                click.echo(json.dumps({"ok": False, "error": exc.to_dict()}))
                sys.exit(1)
            _fail(f"{exc.code}: {exc.message}", 1)
    click.echo(json.dumps({"ok": True, **res.to_dict()}) if as_json else str(res.path))


def _sources_from(args: tuple[str, ...]) -> list[tuple[str, str | None, str | None]]:
    """Sources (with version_id and sha256) named on the command line or read from files."""
    found: list[tuple[str, str | None, str | None]] = []
    for arg in args:
        if "://" in arg or not os.path.isfile(arg):
            found.append((arg, None, None))
            continue
        try:
            with open(arg, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            _fail(f"assetd: cannot read {arg}: {exc}", 2)
        items = data.get("assets") if isinstance(data, dict) else data
        if not isinstance(items, list):
            _fail(f'assetd: {arg}: expected {{"assets": [...]}} or a list of sources', 2)
        for item in items:
            if isinstance(item, str):
                found.append((item, None, None))
            elif (
                isinstance(item, dict)
                and isinstance(item.get("source"), str)
                and isinstance(item.get("version_id"), str | None)
                and isinstance(item.get("sha256"), str | None)
            ):
                # a locked setup config warms exactly its pinned content
                found.append((item["source"], item.get("version_id"), item.get("sha256")))
            else:
                _fail(
                    f"assetd: {arg}: each entry needs a string 'source' "
                    "(and 'version_id', 'sha256')",
                    2,
                )
    return found


@cli.command()
@click.argument("items", nargs=-1, required=True)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Deadline per source.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary line.")
@_socket_option
def prefetch(
    items: tuple[str, ...], timeout_s: float | None, as_json: bool, socket_path: str | None
) -> None:
    """Warm the cache from FILEs (setup configs or source lists) or SOURCEs."""
    sources = _sources_from(items)
    summary = {"objects": len(sources), "bytes": 0, "hits": 0, "misses": 0, "errors": 0}
    failures: list[str] = []
    batch = 8  # small batches: the progress bar moves, the daemon still fetches in parallel
    show = sys.stderr.isatty() and not as_json
    bar_cm: Any = (
        click.progressbar(length=len(sources), label="prefetch", file=sys.stderr)
        if show
        else contextlib.nullcontext()
    )
    with _client(socket_path, timeout=(timeout_s or 300) * 2 + 5) as client, bar_cm as bar:
        for start in range(0, len(sources), batch):
            chunk = sources[start : start + batch]
            try:
                results = client.prefetch(chunk, timeout_s=timeout_s)
            except DaemonUnreachable as exc:
                _unreachable(exc)
            except AssetError as exc:
                _fail(f"{exc.code}: {exc.message}", 1)
            for (source, _vid, _sha), res in zip(chunk, results, strict=True):
                if isinstance(res, AssetError):
                    summary["errors"] += 1
                    failures.append(f"{source}: {res.code}: {res.message}")
                    continue
                summary["bytes"] += res.size
                summary["hits" if res.cache in ("hit", "stale") else "misses"] += 1
            if bar is not None:
                bar.update(len(chunk))
    for line in failures:
        click.echo(line, err=True)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(
            f"{summary['objects']} objects, {summary['bytes']} bytes: {summary['hits']} hits, "
            f"{summary['misses']} misses, {summary['errors']} errors"
        )
    sys.exit(1 if summary["errors"] else 0)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw figures as JSON.")
@_socket_option
def stats(as_json: bool, socket_path: str | None) -> None:
    """Show the daemon's cache and request counters."""
    with _client(socket_path, timeout=30) as client:
        try:
            figures = client.stats()
        except DaemonUnreachable as exc:
            _unreachable(exc)
        except AssetError as exc:
            _fail(f"{exc.code}: {exc.message}", 1)
    if as_json:
        click.echo(json.dumps(figures))
        return
    rows = [
        ("entries", figures["entries"]),
        ("bytes", figures["bytes"]),
        ("hits", figures["hits"]),
        ("misses", figures["misses"]),
        ("coalesced", figures["coalesced"]),
        ("stale", figures["stale"]),
        ("bytes fetched", figures["bytes_fetched"]),
        ("S3 HEAD / GET", f"{figures['s3_requests']['head']} / {figures['s3_requests']['get']}"),
    ]
    rows += [(f"errors: {code}", n) for code, n in sorted(figures["errors"].items())]
    for op, outcomes in figures.get("latency", {}).items():
        for outcome, h in outcomes.items():
            rows.append(
                (
                    f"{op} {outcome}",
                    f"{h['count']} (p50 <= {h['p50_le_ms']} ms, p99 <= {h['p99_le_ms']} ms)",
                )
            )
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")


EXIT_CACHE_BUSY = 4  # another process holds the cache and no daemon answered


def _via_daemon(cfg: Config, socket_path: str | None, op: str) -> dict[str, Any] | None:
    """Run a maintenance op in the daemon that holds the cache; None if none answers."""
    path = socket_path or cfg.daemon.socket  # the config's, with ASSETD_SOCKET applied
    with _client(path, timeout=30) as client:
        try:
            # recovery of a big cache, or verify reading every byte, takes long
            reply = client.call({"op": op}, timeout=3600.0 if op == "gc" else 24 * 3600.0)
        except DaemonUnreachable as exc:
            if exc.denied:  # a daemon is there, but not for us: offline would be refused too
                _unreachable(exc)
            return None
        except AssetError as exc:
            _fail(f"{exc.code}: {exc.message}", 1)
    if not reply.get("ok"):
        err = AssetError.from_dict(reply.get("error") or {})
        _fail(f"{err.code}: {err.message}", 1)
    return reply


def _open_store(cfg: Config, socket_path: str | None) -> Any:
    """The cache, owned by this process (offline gc/verify); exits if another owns it."""
    from assetd.store import CacheLocked, Store

    try:
        return Store(cfg.cache.dir, lock=True)
    except CacheLocked as exc:
        _fail(
            f"assetd: {exc.strerror}, and no daemon answered on "
            f"{socket_path or cfg.daemon.socket}; "
            "try again once it has stopped",
            EXIT_CACHE_BUSY,
        )
    except AssetError as exc:
        _fail(f"assetd: cannot open the cache at {cfg.cache.dir}: {exc.message}", 2)


@cli.command()
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_socket_option
def gc(config_path: str | None, as_json: bool, socket_path: str | None) -> None:
    """Run eviction now: recover the index, then evict LRU unpinned entries over the limits.

    Runs inside the daemon when one holds the cache, else on the cache directly.
    """
    from assetd.store import EvictionReport, RecoveryReport

    cfg = _load(config_path)
    reply = _via_daemon(cfg, socket_path, "gc")
    if reply is not None:
        recovery = RecoveryReport(**reply["recovery"])
        report = EvictionReport(**reply["eviction"])
        pruned = int(reply.get("quarantine_removed", 0))
    else:
        store = _open_store(cfg, socket_path)
        try:
            recovery = store.recover()
            report = store.evict(
                max_bytes=cfg.cache.max_bytes, min_free_bytes=cfg.cache.min_free_bytes
            )
            pruned = store.prune_quarantine(
                max_age_s=cfg.cache.quarantine_max_age_s,
                max_bytes=cfg.cache.quarantine_max_bytes,
            )
        finally:
            store.close()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "recovery": recovery.to_dict(),
                    "eviction": report.to_dict(),
                    "quarantine_removed": pruned,
                    "via": "daemon" if reply is not None else "offline",
                }
            )
        )
    else:
        click.echo(
            f"freed {report.freed_bytes} bytes: {report.removed_entries} entries, "
            f"{report.removed_blobs} blobs; {report.bytes_after} bytes cached, "
            f"{report.free_after} bytes free on disk"
            + ("; still over the limits (everything left is pinned)" if report.full else "")
        )
        if recovery.dropped_rows or recovery.deleted_blobs or recovery.quarantined:
            click.echo(
                f"recovery: dropped {recovery.dropped_rows} rows, deleted "
                f"{recovery.deleted_blobs} unreferenced blobs, quarantined {recovery.quarantined}"
            )
    sys.exit(1 if report.full else 0)


@cli.command()
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_socket_option
def verify(config_path: str | None, as_json: bool, socket_path: str | None) -> None:
    """Re-hash every blob; quarantine mismatches; exit 1 if any were found.

    Runs inside the daemon when one holds the cache, else on the cache directly.
    """
    from assetd.store import VerifyReport

    cfg = _load(config_path)
    reply = _via_daemon(cfg, socket_path, "verify")
    if reply is not None:
        fields = VerifyReport.__dataclass_fields__
        report = VerifyReport(**{k: v for k, v in reply.items() if k in fields})
    else:
        store = _open_store(cfg, socket_path)
        try:
            report = store.verify()
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(
            f"checked {report.checked} blobs ({report.bytes} bytes) in {report.seconds}s: "
            f"{len(report.mismatched)} mismatched"
        )
        for sha in report.mismatched:
            click.echo(f"quarantined {sha}: its bytes do not hash to its name", err=True)
    sys.exit(1 if report.mismatched else 0)


def _redact(value: object) -> object:
    """A URL without its userinfo (``https://user:secret@host`` -> ``https://***@host``).

    Userinfo is the one way a secret could appear in the config. It is cut
    at the LAST ``@``, whatever the password holds (``/``, ``@``, ``:``,
    ``#``, ``?``), so nothing of it survives; an ``@`` in a path would be
    over-redacted, which is harmless.
    """
    if not isinstance(value, str) or "://" not in value:
        return value
    scheme, rest = value.split("://", 1)
    if "@" not in rest:
        return value
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@cli.command("config")
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_config(config_path: str | None, as_json: bool) -> None:
    """Print the effective configuration and where each value came from."""
    cfg = _load(config_path)
    rows = {
        name: {"value": _redact(value), "origin": cfg.origins.get(name, "default")}
        for name, value in cfg.values().items()
    }
    if as_json:
        click.echo(json.dumps({"path": cfg.path, "keys": rows}, default=list))
        return
    click.echo(f"# config file: {cfg.path or 'none (defaults and environment only)'}")
    width = max(len(name) for name in rows)
    for name, row in rows.items():
        value = row["value"]
        if name == "daemon.socket_mode" and isinstance(value, int):
            shown = f'"{value:04o}"'
        else:
            shown = json.dumps(list(value) if isinstance(value, tuple) else value)
        click.echo(f"{name:<{width}} = {shown:<40} # {row['origin']}")


@cli.command()
@click.argument("setup", type=click.Path(exists=True, dir_okay=False))
@click.option("--check", is_flag=True, help="Change nothing; exit 1 if any entry drifted.")
@click.option("--upgrade", is_flag=True, help="Drop existing pins; lock the current objects.")
@click.option("--timeout", "timeout_s", type=_SECONDS, default=None, help="Deadline per asset.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_socket_option
def lock(
    setup: str,
    check: bool,
    upgrade: bool,
    timeout_s: float | None,
    as_json: bool,
    socket_path: str | None,
) -> None:
    """Pin each asset of SETUP (a setup config) to its current content, in place."""
    from assetd.lockfile import lock_setup

    if check and upgrade:
        _fail("assetd: --check and --upgrade do not go together", 2)
    with _client(socket_path, timeout=(timeout_s or 300) + 5) as client:
        try:
            report = lock_setup(setup, client, check=check, upgrade=upgrade, timeout_s=timeout_s)
        except DaemonUnreachable as exc:
            _unreachable(exc)
        except AssetError as exc:
            _fail(f"assetd: {setup}: {exc.code}: {exc.message}", 2)
        except OSError as exc:
            _fail(f"assetd: cannot read {setup}: {exc.strerror}", 2)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for entry in report.entries:
            click.echo(entry.line())
        if check:
            verdict = "drifted" if report.problems else "matches its lock"
            click.echo(f"{setup}: {len(report.problems)} of {len(report.entries)} {verdict}")
        elif report.problems:
            click.echo(f"{setup}: not written: {len(report.problems)} assets failed", err=True)
        else:
            click.echo(f"{setup}: {'written' if report.written else 'already locked'}")
    sys.exit(1 if report.problems else 0)


@cli.group()
def catalog() -> None:
    """The asset:// catalog: list its entries, check that each resolves."""


def _load_catalog(cfg: Config, file: str | None) -> Any:
    from assetd.catalog import catalog_path, load_catalog

    path = file or catalog_path(cfg.catalog.file, cfg.path)
    if not path:
        _fail("assetd: no catalog: set catalog.file (or ASSETD_CATALOG_FILE), or pass --file", 2)
    try:
        return load_catalog(path)
    except ConfigError as exc:
        _fail(f"assetd: invalid catalog: {exc}", 2)


_catalog_file = click.option(
    "--file", "file", type=click.Path(), default=None, help="Catalog file (default: catalog.file)."
)


@catalog.command("list")
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@_catalog_file
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def catalog_list(config_path: str | None, file: str | None, as_json: bool) -> None:
    """Print the catalog's entries (no daemon needed)."""
    cat = _load_catalog(_load(config_path), file)
    rows = [e.to_dict() for e in cat.entries.values()]
    if as_json:
        click.echo(json.dumps({"file": cat.path, "entries": rows}))
        return
    click.echo(f"# catalog file: {cat.path} ({len(rows)} entries)")
    for row in rows:
        pins = "".join(f" {k}={row[k]}" for k in ("version_id", "sha256") if row[k] is not None)
        click.echo(f"asset://{row['name']} -> {row['source']}{pins}")


@catalog.command("check")
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@_catalog_file
@click.option("--timeout", "timeout_s", type=_SECONDS, default=None, help="Deadline per entry.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_socket_option
def catalog_check(
    config_path: str | None,
    file: str | None,
    timeout_s: float | None,
    as_json: bool,
    socket_path: str | None,
) -> None:
    """Validate the catalog file, then resolve every name through the daemon."""
    cfg = _load(config_path)
    cat = _load_catalog(cfg, file)
    results = []
    with _client(socket_path or cfg.daemon.socket, timeout=(timeout_s or 300) + 5) as client:
        for entry in cat.entries.values():
            row: dict[str, Any] = {"name": entry.name, "source": str(entry.source)}
            try:
                res = client.resolve(f"asset://{entry.name}", timeout_s=timeout_s, job="catalog")
            except DaemonUnreachable as exc:
                _unreachable(exc)
            except AssetError as exc:
                row["error"] = exc.to_dict()
            else:
                row.update(resolved_source=res.resolved_source, sha256=res.sha256, size=res.size)
                if res.resolved_source != str(entry.source):
                    # the daemon runs another catalog than this file: a failed or pending reload
                    row["error"] = {
                        "code": "stale_catalog",
                        "message": f"the daemon resolves it to {res.resolved_source}; reload it",
                    }
            results.append(row)
    failed = [r for r in results if "error" in r]
    if as_json:
        click.echo(json.dumps({"file": cat.path, "entries": results}))
    else:
        for r in results:
            if "error" in r:
                click.echo(
                    f"FAIL asset://{r['name']}: {r['error']['code']}: {r['error']['message']}"
                )
            else:
                click.echo(
                    f"ok   asset://{r['name']} -> {r['resolved_source']} "
                    f"sha256 {r['sha256'][:12]} {r['size']} bytes"
                )
        click.echo(f"{cat.path}: {len(results) - len(failed)} of {len(results)} resolve")
    sys.exit(1 if failed else 0)


def main() -> None:
    cli(prog_name="assetd")
