"""Unit tests for the assetd command line (CliRunner, a scripted fake daemon, one subprocess)."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from assetd.cli import cli
from tests.support.fakedaemon import FakeDaemon, Script

REPO = Path(__file__).resolve().parents[1]
SHA = "cd" * 32
UNREACHABLE_PREFIX = "cannot reach assetd at "
UNREACHABLE_SUFFIX = "is the service running?"


@pytest.fixture
def daemon(sock_path: str) -> Iterator[Callable[[Script], FakeDaemon]]:
    """Start a FakeDaemon with a given script; stopped after the test."""
    started: list[FakeDaemon] = []

    def start(script: Script) -> FakeDaemon:
        fake = FakeDaemon(sock_path, script).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def resolved_body(source: str, cache: str = "miss", size: int = 10) -> dict[str, Any]:
    """A successful resolve answer's members."""
    return {
        "source": source,
        "path": f"/var/cache/assetd/blobs/sha256/cd/{SHA}",
        "size": size,
        "sha256": SHA,
        "etag": '"etag"',
        "version_id": None,
        "cache": cache,
        "pinned_until": 1764150000.0,
    }


def error_body(code: str, message: str) -> dict[str, Any]:
    """A failed answer's members."""
    return {"ok": False, "error": {"code": code, "message": message, "retryable": False}}


# source -> the per-source prefetch result the fake daemon gives
PREFETCH_TABLE: dict[str, dict[str, Any]] = {
    "s3://b/hit": {"ok": True, **resolved_body("s3://b/hit", "hit", 100)},
    "s3://b/miss": {"ok": True, **resolved_body("s3://b/miss", "miss", 20)},
    "s3://b/stale": {"ok": True, **resolved_body("s3://b/stale", "stale", 3)},
    "s3://b/coalesced": {"ok": True, **resolved_body("s3://b/coalesced", "coalesced", 4)},
    "s3://b/gone": error_body("not_found", "object does not exist"),
}


def prefetch_script(request: dict[str, Any]) -> dict[str, Any]:
    """Answer a prefetch from PREFETCH_TABLE, one result per source, in order."""
    assert "prefetch" == request["op"]
    results = []
    for item in request["sources"]:
        source = item if isinstance(item, str) else item["source"]
        results.append(PREFETCH_TABLE[source])
    return {"results": results}


STATS = {
    "entries": 7,
    "bytes": 1234,
    "hits": 10,
    "misses": 3,
    "coalesced": 1,
    "stale": 0,
    "errors": {"not_found": 2},
    "bytes_fetched": 999,
    "s3_requests": {"head": 4, "get": 3},
    "latency": {"resolve": {"hit": {"count": 10, "p50_le_ms": 0.05, "p99_le_ms": 0.1}}},
}


def run(*args: str) -> Result:
    """Invoke the CLI in-process, keeping stdout and stderr apart."""
    return CliRunner().invoke(cli, list(args), prog_name="assetd")


def _assert_one_unreachable_line(result: Result, path: str) -> None:
    assert 3 == result.exit_code, result.output
    lines = result.stderr.splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith(UNREACHABLE_PREFIX + path + ": ")
    assert lines[0].endswith(UNREACHABLE_SUFFIX)
    assert "" == result.stdout


# -- help and unreachable daemon --------------------------------------------------------------


def test_help_lists_commands() -> None:
    """--help lists every subcommand."""
    result = run("--help")
    assert 0 == result.exit_code
    for command in ("check", "serve", "get", "prefetch", "stats"):
        assert f"  {command}" in result.stdout


def test_version_option() -> None:
    """--version prints the package version."""
    from assetd import __version__

    result = run("--version")
    assert 0 == result.exit_code
    assert __version__ in result.stdout


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeout_is_a_usage_error(value: str) -> None:
    """--timeout must be a positive number: anything else exits 2 before any request."""
    assert (
        2 == run("get", "s3://bkt-test/k", "--timeout", value, "--socket", "/nonexistent").exit_code
    )


@pytest.mark.parametrize(
    "args",
    [("get", "s3://b/k"), ("stats",), ("stats", "--json"), ("prefetch", "s3://b/k")],
    ids=["get", "stats", "stats-json", "prefetch"],
)
def test_unreachable_daemon_exits_3(tmp_path: Path, args: tuple[str, ...]) -> None:
    """With no daemon behind --socket, the command exits 3 with one explanatory line."""
    path = str(tmp_path / "missing.sock")
    _assert_one_unreachable_line(run(*args, "--socket", path), path)


def test_unreachable_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --socket, ASSETD_SOCKET names the socket in the message."""
    path = str(tmp_path / "env.sock")
    monkeypatch.setenv("ASSETD_SOCKET", path)
    _assert_one_unreachable_line(run("get", "s3://b/k"), path)


# -- check ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("s3://Bad_Bucket/key", "malformed_uri"),
        ("s3://bucket-ok/", "malformed_uri"),
        ("http://example.com/file", "unsupported_scheme"),
    ],
)
def test_check_bad_source_exits_1(source: str, code: str) -> None:
    """check of an unparsable source prints an error row with its code and exits 1."""
    result = run("check", source)
    assert 1 == result.exit_code, result.output
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert 1 == len(error_lines), result.stdout
    assert f" {code}: " in error_lines[0]


def test_check_json_reports_error_code() -> None:
    """check --json prints one JSON object with source and error.code."""
    result = run("check", "--json", "s3://Bad_Bucket/key")
    assert 1 == result.exit_code, result.output
    report = json.loads(result.stdout)
    assert "s3://Bad_Bucket/key" == report["source"]
    assert "malformed_uri" == report["error"]["code"]
    assert False is report["error"]["retryable"]
    assert "invalid bucket name 'Bad_Bucket'" == report["error"]["message"]


def test_check_not_allowed_bucket(tmp_path: Path) -> None:
    """check refuses a bucket outside allowed_buckets before any network call."""
    config = tmp_path / "assetd.toml"
    config.write_text('[s3]\nallowed_buckets = ["only-this"]\n')
    result = run("check", "--json", "--config", str(config), "s3://other-bucket/k")
    assert 1 == result.exit_code, result.output
    report = json.loads(result.stdout)
    assert "not_allowed" == report["error"]["code"]
    assert "refused" == report["policy"]
    assert {"bucket": "other-bucket", "key": "k", "version_id": None} == report["parsed"]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[s3]\nmax_attempts = 0\n", "s3.max_attempts"),
        ('[cache]\nmax_bytes = "lots"\n', "cache.max_bytes"),
        ("[cache]\nsize = 1\n", "cache.size"),
        ('[log]\nlevel = "loud"\n', "log.level"),
    ],
)
def test_check_invalid_config_exits_2(tmp_path: Path, toml: str, key: str) -> None:
    """check with an invalid config file exits 2 with one line naming the key."""
    config = tmp_path / "assetd.toml"
    config.write_text(toml)
    result = run("check", "--config", str(config), "s3://bucket/key")
    assert 2 == result.exit_code, result.output
    lines = result.stderr.splitlines()
    assert 1 == len(lines), result.stderr
    assert lines[0].startswith("assetd: invalid config: ")
    assert key in lines[0]
    assert "" == result.stdout


def test_check_missing_config_exits_2(tmp_path: Path) -> None:
    """A config path that does not exist is an invalid config (exit 2)."""
    result = run("check", "--config", str(tmp_path / "nope.toml"), "s3://bucket/key")
    assert 2 == result.exit_code
    assert "config file not found" in result.stderr


# -- get --------------------------------------------------------------------------------------


def test_get_prints_path(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """get prints the local path and sends the request fields."""
    fake = daemon(lambda req: resolved_body(req["source"]))
    args = ["s3://b/k", "--version-id", "v1", "--job", "j1", "--timeout", "9"]
    result = run("get", *args, "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert f"/var/cache/assetd/blobs/sha256/cd/{SHA}\n" == result.stdout
    request = fake.requests[0]
    assert ("resolve", "s3://b/k", "v1", "j1", 9.0) == (
        request["op"],
        request["source"],
        request["version_id"],
        request["job"],
        request["timeout_s"],
    )


def test_get_json(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """get --json prints the whole answer."""
    daemon(lambda req: resolved_body(req["source"], "hit", 42))
    result = run("get", "--json", "s3://b/k", "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert {"ok": True, **resolved_body("s3://b/k", "hit", 42)} == json.loads(result.stdout)


def test_get_error_exits_1(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """A daemon error makes get print "code: message" on stderr and exit 1."""
    daemon(lambda req: error_body("not_found", "object does not exist"))
    result = run("get", "s3://b/k", "--socket", sock_path)
    assert 1 == result.exit_code
    assert "not_found: object does not exist\n" == result.stderr
    assert "" == result.stdout


def test_get_error_json(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """get --json prints a failed answer as JSON and exits 1."""
    daemon(lambda req: error_body("access_denied", "S3 refused access"))
    result = run("get", "--json", "s3://b/k", "--socket", sock_path)
    assert 1 == result.exit_code
    answer = json.loads(result.stdout)
    assert False is answer["ok"]
    assert "access_denied" == answer["error"]["code"]


# -- prefetch ---------------------------------------------------------------------------------


def test_prefetch_setup_config_file(
    daemon: Callable[[Script], FakeDaemon], sock_path: str, tmp_path: Path
) -> None:
    """prefetch reads an assignment's {"assets": [...]} and prints the summary line."""
    fake = daemon(prefetch_script)
    setup = tmp_path / "setup.json"
    setup.write_text(
        json.dumps(
            {
                "assets": [
                    {"source": "s3://b/hit", "target": "/tmp/a", "read_only": True},
                    {"source": "s3://b/miss", "target": "/tmp/b", "version_id": "v7"},
                ]
            }
        )
    )
    result = run("prefetch", str(setup), "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert "2 objects, 120 bytes: 1 hits, 1 misses, 0 errors\n" == result.stdout
    assert "" == result.stderr
    assert [
        {"source": "s3://b/hit", "version_id": None},
        {"source": "s3://b/miss", "version_id": "v7"},
    ] == fake.requests[0]["sources"]


def test_prefetch_list_file_with_error(
    daemon: Callable[[Script], FakeDaemon], sock_path: str, tmp_path: Path
) -> None:
    """A plain list file works; a failed source is reported on stderr and exits 1."""
    daemon(prefetch_script)
    listing = tmp_path / "sources.json"
    listing.write_text(json.dumps(["s3://b/stale", {"source": "s3://b/gone"}, "s3://b/coalesced"]))
    result = run("prefetch", str(listing), "--socket", sock_path)
    assert 1 == result.exit_code, result.output
    assert "3 objects, 7 bytes: 1 hits, 1 misses, 1 errors\n" == result.stdout
    assert "s3://b/gone: not_found: object does not exist\n" == result.stderr


def test_prefetch_sources_on_command_line_in_batches(
    daemon: Callable[[Script], FakeDaemon], sock_path: str
) -> None:
    """Sources given as arguments are sent in batches, all counted in one summary."""
    fake = daemon(prefetch_script)
    sources = ["s3://b/hit"] * 6 + ["s3://b/miss"] * 4
    result = run("prefetch", *sources, "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert "10 objects, 680 bytes: 6 hits, 4 misses, 0 errors\n" == result.stdout
    assert sources == [item["source"] for r in fake.requests for item in r["sources"]]
    assert len(fake.requests) > 1


def test_prefetch_json(
    daemon: Callable[[Script], FakeDaemon], sock_path: str, tmp_path: Path
) -> None:
    """prefetch --json prints the summary as one JSON object."""
    daemon(prefetch_script)
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps({"assets": [{"source": "s3://b/hit"}, {"source": "s3://b/gone"}]}))
    result = run("prefetch", "--json", str(setup), "--socket", sock_path)
    assert 1 == result.exit_code, result.output
    assert {"objects": 2, "bytes": 100, "hits": 1, "misses": 0, "errors": 1} == json.loads(
        result.stdout
    )


def test_prefetch_timeout_is_sent(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """prefetch --timeout travels as timeout_s."""
    fake = daemon(prefetch_script)
    result = run("prefetch", "s3://b/hit", "--timeout", "12", "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert 12.0 == fake.requests[0]["timeout_s"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "cannot read"),
        ('{"assets": "s3://b/k"}', "expected"),
        ('{"assets": [{"target": "/tmp/x"}]}', "each entry needs a string 'source'"),
        ("[42]", "each entry needs a string 'source'"),
    ],
    ids=["not json", "assets not a list", "entry without source", "entry a number"],
)
def test_prefetch_bad_file_exits_2(tmp_path: Path, content: str, needle: str) -> None:
    """An unreadable or ill-shaped sources file exits 2 before contacting the daemon."""
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run("prefetch", str(bad), "--socket", str(tmp_path / "never.sock"))
    assert 2 == result.exit_code, result.output
    assert needle in result.stderr


# -- stats ------------------------------------------------------------------------------------


def test_stats_table(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """stats prints aligned rows of the daemon's figures."""
    daemon(lambda req: STATS)
    result = run("stats", "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    rows = {
        line.split("  ")[0].strip(): line.split("  ", 1)[1].strip()
        for line in result.stdout.splitlines()
    }
    assert "7" == rows["entries"]
    assert "1234" == rows["bytes"]
    assert "4 / 3" == rows["S3 HEAD / GET"]
    assert "2" == rows["errors: not_found"]
    assert rows["resolve hit"].startswith("10 ")


def test_stats_json(daemon: Callable[[Script], FakeDaemon], sock_path: str) -> None:
    """stats --json prints the raw figures, without id and ok."""
    daemon(lambda req: STATS)
    result = run("stats", "--json", "--socket", sock_path)
    assert 0 == result.exit_code, result.output
    assert STATS == json.loads(result.stdout)


# -- a real process ---------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("ASSETD_", "ASSET_S3_"))}


def test_module_help_subprocess() -> None:
    """`python -m assetd --help` runs and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "assetd", "--help"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert 0 == proc.returncode, proc.stderr
    assert "Usage: assetd" in proc.stdout


def test_module_get_unreachable_subprocess() -> None:
    """`python -m assetd get` with a missing socket exits 3 with the one-line message."""
    proc = subprocess.run(
        [sys.executable, "-m", "assetd", "get", "s3://b/k", "--socket", "/nonexistent/x.sock"],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert 3 == proc.returncode, proc.stderr
    assert "" == proc.stdout
    assert [
        "cannot reach assetd at /nonexistent/x.sock: No such file or directory; "
        "is the service running?"
    ] == proc.stderr.splitlines()


PASSWORDS = ["plain", "with/slash", "a@b", "c:d/e@f", "q?x#y"]


@pytest.mark.parametrize("password", PASSWORDS)
def test_config_never_prints_an_endpoint_password(tmp_path: Path, password: str) -> None:
    """`assetd config` (text and JSON) redacts userinfo whatever the password holds (Why 7)."""
    config = tmp_path / "assetd.toml"
    config.write_text(f'[s3]\nendpoint_url = "http://user:{password}@127.0.0.1:9/"\n')
    text = run("config", "--config", str(config))
    as_json = run("config", "--json", "--config", str(config))
    assert 0 == text.exit_code, text.output
    for result in (text, as_json):
        assert "user" not in result.output
        assert password not in result.output
    endpoint = json.loads(as_json.stdout)["keys"]["s3.endpoint_url"]["value"]
    assert "http://***@127.0.0.1:9/" == endpoint


@pytest.mark.parametrize("password", PASSWORDS)
def test_check_never_prints_an_endpoint_password(tmp_path: Path, password: str) -> None:
    """`assetd check` shows the endpoint without its user and password (issue 11, Why 7)."""
    config = tmp_path / "assetd.toml"
    config.write_text(
        f'[s3]\nendpoint_url = "http://user:{password}@127.0.0.1:9/"\n'
        "max_attempts = 1\ndeadline_s = 2\nconnect_timeout_s = 0.5\n"
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
    )
    for flags in ([], ["--json"]):
        result = run("check", *flags, "--config", str(config), "s3://bucket/key")
        assert "http://***@127.0.0.1:9/" in result.output
        assert password not in result.output
        assert "user:" not in result.output
