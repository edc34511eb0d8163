"""Docs that cannot drift from the code.

Each check is a small function over a document's text. The parametrized
tests run it on the real document for every item of the source of truth (an
error code, a config key, an env var, a CLI command, a metric); the
``*_can_fail`` tests run the same function on the document with one item
removed, so a check that could never fail would show up here.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import re
import tomllib
import unicodedata
from pathlib import Path

import pytest

from assetd.cli import cli
from assetd.config import _CONVERTERS, CONFIG_ENV, ENV_OVERRIDES, Config, load_config
from assetd.errors import CODES
from assetd.metrics import Metrics, PrometheusExport

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
SETUP_CONFIG = DOCS / "setup-config.md"
OPERATIONS = DOCS / "operations.md"

KEYS = sorted(Config().values())
ENV_VARS = sorted([*ENV_OVERRIDES, CONFIG_ENV])
COMMANDS = sorted(cli.commands)
# the sections operations.md and the issue ask troubleshooting.md to have
CLASSIC_SECTIONS = (
    "Clock skew",
    "Wrong region or endpoint",
    "A 403 that really means the key is missing",
    "KMS permissions",
    "Throttling",
    "Socket permission denied",
    "The daemon not running",
)
_KEY_LINE = re.compile(
    r"^# ([a-z_]+) = (.*?)\s+# default: [^;]*; (no env override|env ([A-Z0-9_]+))$"
)
_SECTION = re.compile(r"^\[([a-z0-9]+)\]$")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _without_line(text: str, needle: str) -> str:
    """``text`` with every line containing ``needle`` removed."""
    return "\n".join(line for line in text.splitlines() if needle not in line)


# --- the checks -------------------------------------------------------------------


def headings(text: str) -> list[str]:
    """The text of every Markdown heading, outside fenced code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6} (.+?)\s*$", line)):
            found.append(m.group(1))
    return found


def has_code_section(text: str, code: str) -> bool:
    """A ``## `code` `` heading, exactly."""
    return f"## `{code}`" in text.splitlines()


def example_keys(text: str) -> dict[str, str | None]:
    """``section.key`` -> the env override its comment names (None: "no env override")."""
    found: dict[str, str | None] = {}
    section = None
    for line in text.splitlines():
        if m := _SECTION.match(line):
            section = m.group(1)
        elif (m := _KEY_LINE.match(line)) and section is not None:
            found[f"{section}.{m.group(1)}"] = m.group(4)
    return found


def uncommented(text: str) -> str:
    """The example with every ``# key = value`` line turned into a setting."""
    return "\n".join(
        line[2:].split("  # default:", 1)[0] if _KEY_LINE.match(line) else line
        for line in text.splitlines()
    )


def setup_config_keys(text: str) -> set[str]:
    """Keys in the first column of setup-config.md's key table."""
    return set(re.findall(r"^\| `([a-z0-9_]+\.[a-z0-9_]+)` \|", text, re.MULTILINE))


def env_vars_named(text: str) -> set[str]:
    return set(re.findall(r"\b(ASSETD?_[A-Z0-9_]+)\b", text))


def readme_commands(text: str) -> set[str]:
    """Commands named as `` `assetd <name>`` in the README's Commands section."""
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`assetd ([a-z][a-z-]*)", section))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.replace("`", "").strip().lower()
    text = "".join(c for c in text if c in "-_ " or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def broken_links(doc: Path) -> list[str]:
    """Relative links in ``doc`` whose file or #anchor does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(doc)):
        if re.match(r"^[a-z]+:", target):
            continue  # http://, mailto:, file:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        missing_anchor = (
            dest.exists()
            and bool(anchor)
            and dest.suffix == ".md"
            and anchor not in {slug(h) for h in headings(_read(dest))}
        )
        if not dest.exists() or missing_anchor:
            broken.append(target)
    return broken


def exported_metrics() -> set[str]:
    """Metric names the Prometheus export produces (histogram and _total suffixes included)."""
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.observe("resolve", "hit", 0.001)
    stats = {
        "entries": 0,
        "bytes": 0,
        "hits": 0,
        "misses": 0,
        "coalesced": 0,
        "stale": 0,
        "errors": {"timeout": 1},
        "bytes_fetched": 0,
        "s3_requests": {"head": 0, "get": 0},
        "aliases": {"tp2": {"resolved_source": "s3://b/k", "resolves": 1}},
        "background": {"flush": {"ok": True, "total_failures": 0}},
    }
    export = PrometheusExport(lambda: stats, metrics, listen=None, textfile=None)
    text = generate_latest(export.registry).decode()
    return set(re.findall(r"^(assetd_[a-z0-9_]+)", text, re.MULTILINE))


def metrics_named(text: str) -> set[str]:
    return set(re.findall(r"\b(assetd_[a-z0-9_]+)", text))


# --- config.example.toml ------------------------------------------------------------


def test_config_keys_and_converters_agree() -> None:
    """Config().values() and the loader's converters name the same keys."""
    assert sorted(_CONVERTERS) == KEYS


def test_example_config_loads_to_the_defaults() -> None:
    """config.example.toml, as shipped (all commented out), loads to the built-in defaults."""
    assert Config().values() == load_config(EXAMPLE, env={}).values()


def test_example_config_uncommented_is_the_defaults(tmp_path: Path) -> None:
    """Every `# key = value` line, uncommented, states the built-in default."""
    live = tmp_path / "config.toml"
    live.write_text(uncommented(_read(EXAMPLE)), encoding="utf-8")
    cfg = load_config(live, env={})
    assert Config().values() == cfg.values()
    assert {f"file:{live}"} == {cfg.origins[k] for k in KEYS}  # every key was really set


@pytest.mark.parametrize("key", KEYS)
def test_example_config_lists_key_with_its_env_override(key: str) -> None:
    """Each key has a commented line in its section, naming its env override (or none)."""
    env = {name: var for var, name in ENV_OVERRIDES.items()}
    found = example_keys(_read(EXAMPLE))
    assert key in found
    assert env.get(key) == found[key]


def test_example_config_check_can_fail() -> None:
    """Dropping a key's line, or changing its env note, is caught by the same parsing."""
    text = _read(EXAMPLE)
    assert "cache.pin_seconds" not in example_keys(_without_line(text, "# pin_seconds = "))
    wrong = text.replace("env ASSETD_SOCKET", "env ASSETD_SOCKETS")
    assert "ASSETD_SOCKETS" == example_keys(wrong)["daemon.socket"]


def test_uncommented_check_can_fail(tmp_path: Path) -> None:
    """An example line that states a value other than the default is caught."""
    live = tmp_path / "config.toml"
    text = _read(EXAMPLE).replace("# workers = 8 ", "# workers = 9 ")
    live.write_text(uncommented(text), encoding="utf-8")
    assert 9 == load_config(live, env={}).daemon.workers


def test_example_config_is_valid_toml() -> None:
    """The example parses as TOML and has exactly the loader's sections."""
    raw = tomllib.loads(_read(EXAMPLE))
    assert sorted({k.split(".")[0] for k in KEYS}) == sorted(raw)


# --- docs/setup-config.md and env vars --------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_setup_config_documents_key(key: str) -> None:
    """Every config key has a row in setup-config.md's key table."""
    assert key in setup_config_keys(_read(SETUP_CONFIG))


@pytest.mark.parametrize("var", ENV_VARS)
def test_env_var_documented(var: str) -> None:
    """Every env var (overrides and ASSETD_CONFIG) is named in the example and setup-config.md."""
    assert (True, True) == (
        var in env_vars_named(_read(EXAMPLE)),
        var in env_vars_named(_read(SETUP_CONFIG)),
    )


def test_no_unknown_env_vars_documented() -> None:
    """The docs name no ASSET*_ variable that the loader does not read."""
    named = env_vars_named(_read(EXAMPLE)) | env_vars_named(_read(SETUP_CONFIG))
    assert set() == named - set(ENV_VARS)


def test_setup_config_check_can_fail() -> None:
    """Removing a key's row or every mention of a variable is caught."""
    text = _read(SETUP_CONFIG)
    assert "s3.region" not in setup_config_keys(_without_line(text, "| `s3.region` |"))
    assert "ASSET_S3_MAX_SIZE" not in env_vars_named(_without_line(text, "ASSET_S3_MAX_SIZE"))


# --- docs/troubleshooting.md -------------------------------------------------------------


@pytest.mark.parametrize("code", CODES)
def test_troubleshooting_has_section_for_code(code: str) -> None:
    """Every error code has a `## `code`` section."""
    assert has_code_section(_read(TROUBLESHOOTING), code)


@pytest.mark.parametrize("code", CODES)
def test_troubleshooting_section_has_the_four_parts(code: str) -> None:
    """Each code's section says what is seen, the causes, how to diagnose and the fix."""
    section = _read(TROUBLESHOOTING).split(f"\n## `{code}`\n", 1)[1].split("\n## ", 1)[0]
    parts = ("**What the grader and student see.**", "**Common causes", "**Diagnose", "**Fix.**")
    assert [True] * 4 == [part in section for part in parts]


@pytest.mark.parametrize("title", CLASSIC_SECTIONS)
def test_troubleshooting_has_classic_section(title: str) -> None:
    """The classic S3 and socket failures each have a section."""
    assert title in headings(_read(TROUBLESHOOTING))


def test_troubleshooting_check_can_fail() -> None:
    """A code whose heading is missing, or not exactly `## `code``, is caught."""
    text = _read(TROUBLESHOOTING)
    assert not has_code_section(_without_line(text, "## `cache_full`"), "cache_full")
    assert not has_code_section(text.replace("## `integrity`", "## integrity"), "integrity")


# --- README ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_lists_command(command: str) -> None:
    """Every CLI command appears as `assetd <name>` in the README's Commands section."""
    assert command in readme_commands(_read(README))


def test_readme_check_can_fail() -> None:
    """A command mentioned only outside the Commands section does not count."""
    text = _read(README)
    assert "verify" not in readme_commands(_without_line(text, "`assetd verify"))
    moved = _without_line(text, "`assetd gc") + "\n## Elsewhere\n\n`assetd gc` is here.\n"
    assert "gc" not in readme_commands(moved)


# --- links, metrics and the operations runbook ------------------------------------------------


@pytest.mark.parametrize(
    "doc", [README, OPERATIONS, TROUBLESHOOTING, SETUP_CONFIG], ids=lambda p: p.name
)
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link (and #anchor) in the doc points at something that exists."""
    assert [] == broken_links(doc)


def test_link_check_can_fail(tmp_path: Path) -> None:
    """A link to a missing file or a missing heading is reported."""
    doc = tmp_path / "doc.md"
    doc.write_text("# Top\n\n[a](nowhere.md) [b](#top) [c](#bottom)\n", encoding="utf-8")
    assert ["nowhere.md", "#bottom"] == broken_links(doc)


def test_operations_metrics_exist() -> None:
    """Every assetd_* metric operations.md names is one the daemon exports."""
    named = {re.sub(r"_(bucket|count|sum)$", "", m) for m in metrics_named(_read(OPERATIONS))}
    exported = {re.sub(r"_(bucket|count|sum)$", "", m) for m in exported_metrics()}
    assert set() == named - exported
    assert {
        "assetd_errors_total",
        "assetd_request_seconds",
        "assetd_cache_bytes",
        "assetd_s3_requests_total",
    } <= named


def test_metrics_check_can_fail() -> None:
    """A misspelt metric name in the runbook would be reported."""
    assert "assetd_error_total" not in exported_metrics()


def test_operations_modes_table_matches_units() -> None:
    """The runbook's table of owners and modes agrees with the shipped units."""
    rows = dict(
        (path, (owner, mode))
        for path, owner, mode in re.findall(
            r"^\| `([^`]+)` \| `([^`]+)` \| `(0\d{3})` \|", _read(OPERATIONS), re.MULTILINE
        )
    )
    unit = _read(ROOT / "systemd" / "assetd.service")
    sock = _read(ROOT / "systemd" / "assetd.socket")

    def setting(text: str, key: str) -> str:
        found = re.search(rf"^{key}=(.*)$", text, re.MULTILINE)
        assert found is not None, key
        return found.group(1)

    owner = f"{setting(unit, 'User')}:{setting(unit, 'Group')}"
    assert (owner, setting(unit, "RuntimeDirectoryMode")) == rows["/run/assetd"]
    assert (owner, setting(unit, "CacheDirectoryMode")) == rows["/var/cache/assetd"]
    assert (
        f"{setting(sock, 'SocketUser')}:{setting(sock, 'SocketGroup')}",
        setting(sock, "SocketMode"),
    ) == rows[setting(sock, "ListenStream")]
    assert ("root:root", "0600") == rows[setting(unit, "EnvironmentFile").lstrip("-")]
