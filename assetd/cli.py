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


def _check(report: _Report, cfg: Config, source: str, version_id: str | None) -> None:
    from assetd.fetcher.s3 import S3Fetcher
    from assetd.service import AssetService
    from assetd.store import Store
    from assetd.uri import parse_s3

    parsed = parse_s3(source)
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
    endpoint = cfg.s3.endpoint_url or "AWS default"
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
    store = Store(cfg.cache.dir)
    service = AssetService(cfg, fetcher, store)
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


def main() -> None:
    cli(prog_name="assetd")
