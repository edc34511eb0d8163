"""Unit tests for assetd.config: defaults, TOML, env overrides, origins, validation."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from assetd import config as config_mod
from assetd.config import (
    ENV_OVERRIDES,
    CacheConfig,
    Config,
    DaemonConfig,
    LocalConfig,
    LogConfig,
    MetricsConfig,
    S3Config,
    load_config,
    parse_size,
)
from assetd.errors import ConfigError
from assetd.policy import Policy

# DESIGN.md "Config": the env overrides are public interface.
DESIGN_ENV_VARS = {
    "ASSET_S3_ALLOWED_BUCKETS",
    "ASSET_S3_ALLOWED_PREFIXES",
    "ASSET_S3_MAX_SIZE",
    "ASSET_S3_REQUEST_TIMEOUT",
    "ASSET_S3_ENDPOINT_URL",
    "ASSETD_SOCKET",
    "ASSETD_CACHE_DIR",
    "ASSETD_CATALOG_FILE",  # DESIGN.md "v2 additions"
}

# DESIGN.md "Config": keys by section (metrics keys are the project's own).
DESIGN_KEYS = {
    "daemon": {"socket", "socket_mode", "socket_group", "allowed_uids", "allowed_gids", "workers"},
    "cache": {
        "dir",
        "max_bytes",
        "min_free_bytes",
        "pin_seconds",
        "revalidate_after_s",
        "serve_stale_on_error",
        "negative_ttl_s",
    },
    "s3": {
        "endpoint_url",
        "region",
        "addressing_style",
        "allowed_buckets",
        "allowed_prefixes",
        "max_object_bytes",
        "connect_timeout_s",
        "read_timeout_s",
        "max_attempts",
        "deadline_s",
    },
    "local": {"root"},
    "log": {"format", "level"},
    "catalog": {"file"},  # DESIGN.md "v2 additions"
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "assetd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    """With no file and no env, every section holds its safe default."""
    cfg = load_config(env={})
    assert DaemonConfig() == cfg.daemon
    assert CacheConfig() == cfg.cache
    assert S3Config() == cfg.s3
    assert LocalConfig() == cfg.local
    assert LogConfig() == cfg.log
    assert MetricsConfig() == cfg.metrics
    assert None is cfg.path
    assert "/run/assetd/assetd.sock" == cfg.daemon.socket
    assert () == cfg.s3.allowed_buckets
    assert () == cfg.s3.allowed_prefixes
    assert () == cfg.daemon.allowed_uids
    assert 0o660 == cfg.daemon.socket_mode


def test_design_keys_all_exist() -> None:
    """Every key DESIGN.md lists exists as a field of its section."""
    for section, keys in DESIGN_KEYS.items():
        names = {f.name for f in dataclasses.fields(config_mod.SECTIONS[section])}
        assert set() == keys - names, section


def test_converters_cover_exactly_the_fields() -> None:
    """_CONVERTERS has one entry per dataclass field of every section, no more, no less."""
    fields = {
        f"{section}.{f.name}"
        for section, cls in config_mod.SECTIONS.items()
        for f in dataclasses.fields(cls)
    }
    assert fields == set(config_mod._CONVERTERS)


def test_sections_are_the_config_fields() -> None:
    """SECTIONS names every section field of Config."""
    section_fields = {
        f.name for f in dataclasses.fields(Config) if f.name not in ("path", "origins")
    }
    assert section_fields == set(config_mod.SECTIONS)


def test_env_overrides_match_design() -> None:
    """ENV_OVERRIDES holds exactly DESIGN.md's env variables, each mapped to a real key."""
    assert DESIGN_ENV_VARS == set(ENV_OVERRIDES)
    assert set() == set(ENV_OVERRIDES.values()) - set(config_mod._CONVERTERS)


FULL_TOML = """
[daemon]
socket = "/srv/assetd.sock"
socket_mode = "0600"
socket_group = "graders"
allowed_uids = [1000, 1001]
allowed_gids = [50]
workers = 3
admin_uids = [1002]
admin_gids = [51]
max_connections = 200
max_pipelined = 4
max_unsent_bytes = "1MiB"
idle_timeout_s = 30
line_timeout_s = 2.5

[cache]
dir = "/srv/cache"
max_bytes = "512MiB"
min_free_bytes = "2GB"
pin_seconds = 120
revalidate_after_s = 0
serve_stale_on_error = false
negative_ttl_s = 2.5
quarantine_max_age_s = 60
quarantine_max_bytes = "1MiB"

[s3]
endpoint_url = "http://127.0.0.1:9000"
region = "sa-east-1"
addressing_style = "path"
allowed_buckets = ["autograder-assets", "other-bucket"]
allowed_prefixes = ["datasets/", "public/"]
max_object_bytes = "1KiB"
connect_timeout_s = 1.5
read_timeout_s = 7
max_attempts = 2
deadline_s = 30
part_size = "4MiB"
max_concurrency = 6

[local]
root = "/srv/local"

[log]
format = "json"
level = "debug"

[metrics]
listen = "127.0.0.1:9100"
textfile = "/srv/metrics.prom"
socket = "/srv/metrics.sock"

[catalog]
file = "/srv/catalog.toml"
"""


def test_file_values(tmp_path: Path) -> None:
    """Every key set in a TOML file reaches the config, converted."""
    path = _write(tmp_path, FULL_TOML)
    cfg = load_config(path, env={})
    assert str(path) == cfg.path
    assert (
        DaemonConfig(
            socket="/srv/assetd.sock",
            socket_mode=0o600,
            socket_group="graders",
            allowed_uids=(1000, 1001),
            allowed_gids=(50,),
            workers=3,
            admin_uids=(1002,),
            admin_gids=(51,),
            max_connections=200,
            max_pipelined=4,
            max_unsent_bytes=1 << 20,
            idle_timeout_s=30.0,
            line_timeout_s=2.5,
        )
        == cfg.daemon
    )
    assert (
        CacheConfig(
            dir="/srv/cache",
            max_bytes=512 << 20,
            min_free_bytes=2_000_000_000,
            pin_seconds=120.0,
            revalidate_after_s=0.0,
            serve_stale_on_error=False,
            negative_ttl_s=2.5,
            quarantine_max_age_s=60.0,
            quarantine_max_bytes=1 << 20,
        )
        == cfg.cache
    )
    assert (
        S3Config(
            endpoint_url="http://127.0.0.1:9000",
            region="sa-east-1",
            addressing_style="path",
            allowed_buckets=("autograder-assets", "other-bucket"),
            allowed_prefixes=("datasets/", "public/"),
            max_object_bytes=1024,
            connect_timeout_s=1.5,
            read_timeout_s=7.0,
            max_attempts=2,
            deadline_s=30.0,
            part_size=4 << 20,
            max_concurrency=6,
        )
        == cfg.s3
    )
    assert LocalConfig(root="/srv/local") == cfg.local
    assert LogConfig(format="json", level="debug") == cfg.log
    assert (
        MetricsConfig(
            listen="127.0.0.1:9100", textfile="/srv/metrics.prom", socket="/srv/metrics.sock"
        )
        == cfg.metrics
    )


def test_every_key_origin_is_file_when_file_sets_it(tmp_path: Path) -> None:
    """A file that sets every key records file:<path> as every origin."""
    path = _write(tmp_path, FULL_TOML)
    cfg = load_config(path, env={})
    assert {name: f"file:{path}" for name in config_mod._CONVERTERS} == dict(cfg.origins)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    """Keys absent from the file keep their defaults and 'default' origin."""
    path = _write(tmp_path, "[s3]\nregion = 'eu-west-1'\n")
    cfg = load_config(path, env={})
    assert "eu-west-1" == cfg.s3.region
    assert S3Config().max_object_bytes == cfg.s3.max_object_bytes
    assert CacheConfig() == cfg.cache
    assert f"file:{path}" == cfg.origins["s3.region"]
    assert "default" == cfg.origins["s3.max_object_bytes"]
    assert "default" == cfg.origins["cache.dir"]


def test_config_path_from_env(tmp_path: Path) -> None:
    """ASSETD_CONFIG names the file when no path is given."""
    path = _write(tmp_path, "[log]\nlevel = 'error'\n")
    cfg = load_config(env={"ASSETD_CONFIG": str(path)})
    assert "error" == cfg.log.level
    assert str(path) == cfg.path
    assert f"file:{path}" == cfg.origins["log.level"]


def test_explicit_path_beats_config_env(tmp_path: Path) -> None:
    """An explicit path wins over ASSETD_CONFIG."""
    explicit = _write(tmp_path, "[log]\nlevel = 'error'\n")
    other = tmp_path / "other.toml"
    other.write_text("[log]\nlevel = 'debug'\n", encoding="utf-8")
    cfg = load_config(explicit, env={"ASSETD_CONFIG": str(other)})
    assert "error" == cfg.log.level


# env var -> (TOML line in its section, env value, expected effective value)
ENV_CASES: dict[str, tuple[str, str, object]] = {
    "ASSET_S3_ALLOWED_BUCKETS": (
        "allowed_buckets = ['file-bucket']",
        "env-a, env-b,,",
        ("env-a", "env-b"),
    ),
    "ASSET_S3_ALLOWED_PREFIXES": ("allowed_prefixes = ['file/']", "a/,b/", ("a/", "b/")),
    "ASSET_S3_MAX_SIZE": ("max_object_bytes = '1MiB'", "2MiB", 2 << 20),
    "ASSET_S3_REQUEST_TIMEOUT": ("deadline_s = 10", "42.5", 42.5),
    "ASSET_S3_ENDPOINT_URL": (
        "endpoint_url = 'http://file:9000'",
        "http://env:9000",
        "http://env:9000",
    ),
    "ASSETD_SOCKET": ("socket = '/file.sock'", "/env.sock", "/env.sock"),
    "ASSETD_CACHE_DIR": ("dir = '/file-cache'", "/env-cache", "/env-cache"),
    "ASSETD_CATALOG_FILE": ("file = '/file.toml'", "/env-catalog.toml", "/env-catalog.toml"),
}


def test_env_cases_cover_every_override() -> None:
    """The override table below tests every variable in ENV_OVERRIDES."""
    assert set(ENV_OVERRIDES) == set(ENV_CASES)


@pytest.mark.parametrize("var", sorted(ENV_CASES))
def test_env_override_beats_file(tmp_path: Path, var: str) -> None:
    """Each env override wins over the file's value and records env:<VAR> as origin."""
    name = ENV_OVERRIDES[var]
    section, key = name.split(".")
    toml_line, env_value, expected = ENV_CASES[var]
    path = _write(tmp_path, f"[{section}]\n{toml_line}\n")
    file_only = load_config(path, env={})
    assert expected != getattr(getattr(file_only, section), key)
    assert f"file:{path}" == file_only.origins[name]
    cfg = load_config(path, env={var: env_value})
    assert expected == getattr(getattr(cfg, section), key)
    assert f"env:{var}" == cfg.origins[name]


@pytest.mark.parametrize("var", sorted(ENV_CASES))
def test_env_override_without_file(var: str) -> None:
    """Each env override applies over the defaults too."""
    name = ENV_OVERRIDES[var]
    section, key = name.split(".")
    _, env_value, expected = ENV_CASES[var]
    cfg = load_config(env={var: env_value})
    assert expected == getattr(getattr(cfg, section), key)
    assert f"env:{var}" == cfg.origins[name]


def test_unrelated_env_is_ignored() -> None:
    """Env variables that are not overrides change nothing."""
    cfg = load_config(env={"ASSET_S3_REGION": "x", "ASSETD_WORKERS": "99", "HOME": "/root"})
    assert S3Config() == cfg.s3
    assert DaemonConfig() == cfg.daemon


def test_origins_default() -> None:
    """Without file or env, every key's origin is 'default'."""
    cfg = load_config(env={})
    assert {name: "default" for name in config_mod._CONVERTERS} == dict(cfg.origins)


@pytest.mark.parametrize("var", sorted(ENV_CASES))
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_env_counts_as_unset(tmp_path: Path, var: str, value: str) -> None:
    """A set-but-empty override is ignored: the file's value and origin stay."""
    name = ENV_OVERRIDES[var]
    section, key = name.split(".")
    toml_line, _, _ = ENV_CASES[var]
    path = _write(tmp_path, f"[{section}]\n{toml_line}\n")
    expected = getattr(getattr(load_config(path, env={}), section), key)
    cfg = load_config(path, env={var: value})
    assert expected == getattr(getattr(cfg, section), key)
    assert f"file:{path}" == cfg.origins[name]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("0", 0),
        ("12B", 12),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("512MiB", 512 << 20),
        ("512 MiB", 512 << 20),
        ("2GB", 2_000_000_000),
        ("2GiB", 2 << 30),
        ("1TiB", 1 << 40),
        ("3MB", 3_000_000),
        (" 7 KiB ", 7 << 10),
        ("1.5KiB", 1536),
    ],
)
def test_parse_size_valid(value: object, expected: int) -> None:
    """parse_size accepts ints and B/KB/MB/GB/KiB/MiB/GiB/TiB strings."""
    assert expected == parse_size(value)


@pytest.mark.parametrize(
    "value",
    ["", "abc", "-1", "-1GB", "1XB", "1 GiBs", "GiB", "1e3", "1,000", -1, 1.5, True, None, [1]],
)
def test_parse_size_invalid(value: object) -> None:
    """parse_size rejects negatives, unknown units, floats, bools and junk with ValueError."""
    with pytest.raises(ValueError):
        parse_size(value)


def test_parse_size_decimal_fraction_is_exact() -> None:
    """A fractional decimal size is converted exactly (1.001 KB is 1001 bytes)."""
    assert 1001 == parse_size("1.001KB")


def test_parse_size_large_plain_count_is_exact() -> None:
    """A plain byte-count string keeps full precision."""
    assert 2**53 + 1 == parse_size(str(2**53 + 1))


INVALID: list[tuple[str, str | None, dict[str, str], str]] = [
    # id, TOML text (None: no file), env, text the message must contain
    ("unknown-key", "[daemon]\nsockets = '/x'\n", {}, "daemon.sockets"),
    ("unknown-section", "[bogus]\nx = 1\n", {}, "bogus"),
    ("top-level-key", "socket = '/x'\n", {}, "socket"),
    ("section-not-table", "daemon = 1\n", {}, "daemon"),
    ("wrong-type-workers", "[daemon]\nworkers = 'many'\n", {}, "daemon.workers"),
    ("zero-workers", "[daemon]\nworkers = 0\n", {}, "daemon.workers"),
    ("bool-workers", "[daemon]\nworkers = true\n", {}, "daemon.workers"),
    ("wrong-type-dir", "[cache]\ndir = 5\n", {}, "cache.dir"),
    ("empty-dir", "[cache]\ndir = ''\n", {}, "cache.dir"),
    ("wrong-type-buckets", "[s3]\nallowed_buckets = 5\n", {}, "s3.allowed_buckets"),
    ("wrong-type-uids", "[daemon]\nallowed_uids = ['root']\n", {}, "daemon.allowed_uids"),
    ("negative-uid", "[daemon]\nallowed_uids = [-1]\n", {}, "daemon.allowed_uids"),
    ("wrong-type-timeout", "[s3]\nread_timeout_s = 'slow'\n", {}, "s3.read_timeout_s"),
    ("zero-timeout", "[s3]\nconnect_timeout_s = 0\n", {}, "s3.connect_timeout_s"),
    ("nan-pin", "[cache]\npin_seconds = nan\n", {}, "cache.pin_seconds"),
    ("negative-pin", "[cache]\npin_seconds = -1\n", {}, "cache.pin_seconds"),
    ("negative-size", "[cache]\nmax_bytes = -1\n", {}, "cache.max_bytes"),
    ("negative-size-str", "[s3]\nmax_object_bytes = '-1GB'\n", {}, "s3.max_object_bytes"),
    ("zero-max-bytes", "[cache]\nmax_bytes = 0\n", {}, "cache.max_bytes"),
    ("bad-size-unit", "[cache]\nmin_free_bytes = '1 parsec'\n", {}, "cache.min_free_bytes"),
    ("float-size", "[cache]\nmax_bytes = 1.5\n", {}, "cache.max_bytes"),
    ("bad-mode-digit", "[daemon]\nsocket_mode = '0999'\n", {}, "daemon.socket_mode"),
    ("bad-mode-range", "[daemon]\nsocket_mode = 0o1777\n", {}, "daemon.socket_mode"),
    ("bad-mode-type", "[daemon]\nsocket_mode = true\n", {}, "daemon.socket_mode"),
    ("bad-addressing", "[s3]\naddressing_style = 'diagonal'\n", {}, "s3.addressing_style"),
    ("bad-log-format", "[log]\nformat = 'xml'\n", {}, "log.format"),
    ("bad-log-level", "[log]\nlevel = 'loud'\n", {}, "log.level"),
    ("bad-bool", "[cache]\nserve_stale_on_error = 'maybe'\n", {}, "cache.serve_stale_on_error"),
    ("int-bool", "[cache]\nserve_stale_on_error = 1\n", {}, "cache.serve_stale_on_error"),
    ("zero-attempts", "[s3]\nmax_attempts = 0\n", {}, "s3.max_attempts"),
    ("env-bad-size", None, {"ASSET_S3_MAX_SIZE": "lots"}, "ASSET_S3_MAX_SIZE"),
    ("env-zero-size", None, {"ASSET_S3_MAX_SIZE": "0"}, "s3.max_object_bytes"),
    ("env-bad-timeout", None, {"ASSET_S3_REQUEST_TIMEOUT": "soon"}, "s3.deadline_s"),
    ("env-neg-timeout", None, {"ASSET_S3_REQUEST_TIMEOUT": "-5"}, "ASSET_S3_REQUEST_TIMEOUT"),
    ("env-zero-timeout", None, {"ASSET_S3_REQUEST_TIMEOUT": "0"}, "s3.deadline_s"),
    ("zero-deadline", "[s3]\ndeadline_s = 0\n", {}, "s3.deadline_s"),
    ("env-inf-timeout", None, {"ASSET_S3_REQUEST_TIMEOUT": "inf"}, "s3.deadline_s"),
    ("invalid-toml", "[daemon\nsocket = \n", {}, "assetd.toml"),
    ("not-utf8", None, {}, "assetd.toml"),
]


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [(t, e, n) for _, t, e, n in INVALID],
    ids=[i for i, _, _, _ in INVALID],
)
def test_invalid_config(tmp_path: Path, toml: str | None, env: dict[str, str], needle: str) -> None:
    """Each invalid config raises ConfigError with one line that names the key."""
    path: Path | None = None
    if toml is not None:
        path = _write(tmp_path, toml)
    elif not env:  # not-utf8: a file whose bytes are not UTF-8
        path = tmp_path / "assetd.toml"
        path.write_bytes(b"[log]\nlevel = '\xff'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    text = str(info.value)
    assert needle in text
    assert "\n" not in text
    assert "Traceback" not in text


def test_missing_file(tmp_path: Path) -> None:
    """A missing config file raises ConfigError naming the path."""
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, env={})
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_named_by_env(tmp_path: Path) -> None:
    """ASSETD_CONFIG pointing at a missing file raises ConfigError naming it."""
    missing = tmp_path / "gone.toml"
    with pytest.raises(ConfigError) as info:
        load_config(env={"ASSETD_CONFIG": str(missing)})
    assert str(missing) in str(info.value)


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    """A directory given as config file raises ConfigError, not OSError."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert str(tmp_path) in str(info.value)


def test_mode_is_an_octal_string(tmp_path: Path) -> None:
    """socket_mode is written as an octal string; a bare integer is ambiguous and refused."""
    path = _write(tmp_path, "[daemon]\nsocket_mode = '0640'\n")
    assert 0o640 == load_config(path, env={}).daemon.socket_mode
    for bare in ("400", "0o660"):  # in range, yet ambiguous: 400 would read as 0o620
        with pytest.raises(ConfigError, match=r"daemon\.socket_mode"):
            load_config(_write(tmp_path, f"[daemon]\nsocket_mode = {bare}\n"), env={})


@pytest.mark.parametrize(("text", "expected"), [("'yes'", True), ("'off'", False), ("true", True)])
def test_bool_spellings(tmp_path: Path, text: str, expected: bool) -> None:
    """serve_stale_on_error accepts TOML booleans and yes/no/on/off strings."""
    path = _write(tmp_path, f"[cache]\nserve_stale_on_error = {text}\n")
    assert expected is load_config(path, env={}).cache.serve_stale_on_error


def test_empty_optional_text_is_none(tmp_path: Path) -> None:
    """An empty optional string (endpoint_url, region) means unset."""
    path = _write(tmp_path, "[s3]\nendpoint_url = ''\nregion = ''\n")
    cfg = load_config(path, env={})
    assert None is cfg.s3.endpoint_url
    assert None is cfg.s3.region


def test_policy_reflects_s3_settings(tmp_path: Path) -> None:
    """Config.policy() carries the s3 allowlists and size cap."""
    path = _write(
        tmp_path,
        "[s3]\nallowed_buckets = ['a-bucket', 'b-bucket']\n"
        "allowed_prefixes = ['datasets/']\nmax_object_bytes = '2KiB'\n",
    )
    cfg = load_config(path, env={})
    assert (
        Policy(
            allowed_buckets=frozenset({"a-bucket", "b-bucket"}),
            allowed_prefixes=("datasets/",),
            max_object_bytes=2048,
        )
        == cfg.policy()
    )


def test_policy_follows_replaced_section() -> None:
    """A config changed with dataclasses.replace gives the matching policy."""
    cfg = load_config(env={})
    cfg = dataclasses.replace(
        cfg, s3=dataclasses.replace(cfg.s3, allowed_buckets=("x-bucket",), max_object_bytes=5)
    )
    assert Policy(frozenset({"x-bucket"}), (), 5) == cfg.policy()


def test_values_lists_every_key() -> None:
    """Config.values() has one entry per key with the effective value."""
    cfg = load_config(env={"ASSETD_CACHE_DIR": "/c"})
    values = cfg.values()
    assert set(config_mod._CONVERTERS) == set(values)
    assert "/c" == values["cache.dir"]


@pytest.mark.parametrize("var", ["ASSET_S3_ALLOWED_BUCKETS", "ASSET_S3_ALLOWED_PREFIXES"])
@pytest.mark.parametrize("value", [",", " , ", ",,"])
def test_separator_only_env_list_does_not_open_allowlist(
    tmp_path: Path, var: str, value: str
) -> None:
    """An env allowlist with no items never replaces the file's allowlist with 'allow all'."""
    path = _write(
        tmp_path, "[s3]\nallowed_buckets = ['assets']\nallowed_prefixes = ['datasets/']\n"
    )
    name = ENV_OVERRIDES[var]
    try:
        cfg = load_config(path, env={var: value})
    except ConfigError as exc:  # refusing it outright is fine too
        assert name in str(exc)
        return
    assert () != getattr(cfg.s3, name.split(".")[1])
