"""The ``assetd`` command line."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, NoReturn

import click

from assetd import __version__
from assetd.config import Config, load_config
from assetd.errors import AssetError, ConfigError

__all__ = ["main"]


def _load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        _fail(f"assetd: invalid config: {exc}", 2)


def _fail(line: str, code: int) -> NoReturn:
    click.echo(line, err=True)
    sys.exit(code)


def _row(label: str, value: object) -> None:
    click.echo(f"{label + ':':<13}{value}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="assetd")
def cli() -> None:
    """Cache S3 assets on a grading host and hand out local paths."""


@cli.command()
@click.argument("source")
@click.option("--version-id", default=None, help="Fetch this object version.")
@click.option("--config", "config_path", type=click.Path(), default=None, help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def check(source: str, version_id: str | None, config_path: str | None, as_json: bool) -> None:
    """Diagnose one SOURCE in-process: parse, policy, credentials, HEAD, fetch."""
    from assetd.fetcher.s3 import S3Fetcher
    from assetd.service import AssetService
    from assetd.store import Store
    from assetd.uri import parse_s3

    cfg = _load(config_path)
    report: dict[str, Any] = {"source": source}

    def done(err: AssetError | None) -> NoReturn:
        if err is not None:
            report["error"] = err.to_dict()
        if as_json:
            click.echo(json.dumps(report))
        elif err is not None:
            _row("error", f"{err.code}: {err.message}")
        sys.exit(0 if err is None else 1)

    try:
        parsed = parse_s3(source)
        report["parsed"] = {"bucket": parsed.bucket, "key": parsed.key, "version_id": version_id}
        if not as_json:
            _row("parsed", f"bucket={parsed.bucket} key={parsed.key} version_id={version_id}")
        cfg.policy().check_source(parsed)
    except AssetError as exc:
        report["policy"] = "refused" if exc.code == "not_allowed" else "not evaluated"
        done(exc)
    buckets = ", ".join(cfg.s3.allowed_buckets) or "any (IAM is the only boundary)"
    prefixes = ", ".join(cfg.s3.allowed_prefixes) or "any"
    report["policy"] = "allowed"
    fetcher = S3Fetcher(cfg.s3)
    report["credentials"] = fetcher.credential_source()
    report["endpoint"] = cfg.s3.endpoint_url or "AWS default"
    if not as_json:
        _row("policy", f"allowed (buckets: {buckets}; prefixes: {prefixes})")
        _row("limit", f"{cfg.s3.max_object_bytes} bytes")
        _row("credentials", report["credentials"] or "none found in boto3's default chain")
        _row("endpoint", report["endpoint"])
    try:
        deadline = time.monotonic() + cfg.s3.deadline_s
        meta = fetcher.head(parsed.bucket, parsed.key, version_id, deadline=deadline)
        report["head"] = {
            "size": meta.size,
            "etag": meta.etag,
            "version_id": meta.version_id,
            "md5_check": meta.md5 is not None,
            "sha256_check": meta.sha256 is not None,
        }
        if not as_json:
            checks = ["size"] + ["md5"] * (meta.md5 is not None)
            checks += ["sha256"] * (meta.sha256 is not None)
            _row(
                "head",
                f"size={meta.size} etag={meta.etag} version_id={meta.version_id} "
                f"verify={'+'.join(checks)}",
            )
        store = Store(cfg.cache.dir)
        service = AssetService(cfg, fetcher, store)
        try:
            started = time.perf_counter()
            resolved = service.resolve(source, version_id)
            took = time.perf_counter() - started
        finally:
            service.close()
            store.close()
    except AssetError as exc:
        done(exc)
    report["result"] = resolved.to_dict() | {"seconds": round(took, 4)}
    if not as_json:
        _row("fetch", f"{resolved.cache} in {took:.3f}s")
        _row("path", resolved.path)
        _row("sha256", resolved.sha256)
    done(None)


def main() -> None:
    cli(prog_name="assetd")
