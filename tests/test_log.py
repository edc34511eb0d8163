"""Unit tests for assetd.log: JSON/console rendering, level filtering, buffering, failures."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from assetd import log
from assetd.log import redact_urls


@pytest.fixture(autouse=True)
def harmless_logging() -> Iterator[None]:
    """Leave logging configured to a throwaway stream after each test."""
    yield
    log.configure("json", "info", stream=io.StringIO())


@pytest.fixture
def slow_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the background flush timer slow, so only explicit flushes write."""
    monkeypatch.setattr(log, "FLUSH_EVERY_S", 60.0)


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class BrokenStream:
    """A stream whose every write fails, like stderr on a closed pipe."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise self.exc

    def flush(self) -> None:
        raise self.exc

    def isatty(self) -> bool:
        return False


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def _wait_for(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def test_json_line_has_event_level_timestamp_and_fields() -> None:
    """An info event becomes one JSON line with event, level, timestamp and its fields."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    log.get_logger().info("resolve", source="s3://b/k", job="job-7", bytes=12)
    log.flush()
    lines = _lines(stream)
    assert 1 == len(lines)
    record = json.loads(lines[0])
    assert "resolve" == record["event"]
    assert "info" == record["level"]
    assert "s3://b/k" == record["source"]
    assert "job-7" == record["job"]
    assert 12 == record["bytes"]
    assert record["timestamp"].endswith("Z")  # ISO 8601, UTC
    assert "T" in record["timestamp"]


def test_each_event_is_its_own_line() -> None:
    """Several events give as many lines, in order, each valid JSON."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    logger = log.get_logger()
    for n in range(5):
        logger.info("event", n=n, text="multi\nline")
    log.flush()
    assert [0, 1, 2, 3, 4] == [json.loads(line)["n"] for line in _lines(stream)]


def test_debug_filtered_at_info() -> None:
    """At level info, debug events are dropped."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    log.get_logger().debug("noise", x=1)
    log.flush()
    assert "" == stream.getvalue()


def test_debug_kept_at_debug() -> None:
    """At level debug, debug events are written."""
    stream = io.StringIO()
    log.configure("json", "debug", stream=stream)
    log.get_logger().debug("detail", x=1)
    log.flush()
    assert ["debug"] == [json.loads(line)["level"] for line in _lines(stream)]


def test_info_filtered_at_warning() -> None:
    """At level warning, info is dropped and warnings still pass."""
    stream = io.StringIO()
    log.configure("json", "warning", stream=stream)
    logger = log.get_logger()
    logger.info("quiet")
    logger.warning("loud")
    log.flush()
    assert ["loud"] == [json.loads(line)["event"] for line in _lines(stream)]


def test_info_is_buffered_until_flush(slow_timer: None) -> None:
    """Info lines wait in the buffer until a flush."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    log.get_logger().info("resolve", source="s3://b/k")
    assert "" == stream.getvalue()
    log.flush()
    assert "resolve" == json.loads(stream.getvalue())["event"]


def test_warning_written_through(slow_timer: None) -> None:
    """A warning is written at once, without an explicit flush."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    log.get_logger().warning("no allowed_buckets")
    record = json.loads(stream.getvalue())
    assert "no allowed_buckets" == record["event"]
    assert "warning" == record["level"]


def test_error_flushes_buffered_info_first(slow_timer: None) -> None:
    """An error writes out pending info lines too, in order."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    logger = log.get_logger()
    logger.info("first")
    logger.error("second")
    assert ["first", "second"] == [json.loads(line)["event"] for line in _lines(stream)]


def test_timer_flushes_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffered info lines reach the stream by themselves, without a flush call."""
    monkeypatch.setattr(log, "FLUSH_EVERY_S", 0.02)
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    log.get_logger().info("eventually")
    assert _wait_for(lambda: "eventually" in stream.getvalue())


def test_exception_includes_traceback() -> None:
    """logger.exception renders the traceback into the JSON line."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    try:
        raise ValueError("kaboom")
    except ValueError:
        log.get_logger().exception("request failed", op="resolve")
    record = json.loads(stream.getvalue())
    assert "request failed" == record["event"]
    assert "error" == record["level"]
    assert "ValueError: kaboom" in record["exception"]


def test_console_format_is_not_json() -> None:
    """The console format renders readable text, not JSON."""
    stream = io.StringIO()
    log.configure("console", "info", stream=stream)
    log.get_logger().info("resolve", source="s3://b/k")
    log.flush()
    text = stream.getvalue()
    assert 1 == len(text.splitlines())
    assert "resolve" in text
    assert "source=s3://b/k" in text
    assert "\x1b[" not in text  # no colour codes
    with pytest.raises(ValueError):
        json.loads(text)


def test_auto_format_on_a_tty_is_console() -> None:
    """fmt auto picks the console renderer when the stream is a terminal."""
    stream = TtyStream()
    log.configure("auto", "info", stream=stream)
    log.get_logger().info("hello", who="tty")
    log.flush()
    assert "who=tty" in stream.getvalue()
    with pytest.raises(ValueError):
        json.loads(stream.getvalue())


def test_auto_format_off_a_tty_is_json() -> None:
    """fmt auto picks JSON when the stream is not a terminal."""
    stream = io.StringIO()
    log.configure("auto", "info", stream=stream)
    log.get_logger().info("hello", who="pipe")
    log.flush()
    assert "pipe" == json.loads(stream.getvalue())["who"]


@pytest.mark.parametrize(
    "exc", [BrokenPipeError(32, "Broken pipe"), OSError(5, "I/O error")], ids=["epipe", "eio"]
)
def test_failing_stream_never_raises(exc: Exception) -> None:
    """A stream whose write raises OSError never makes logging raise."""
    stream = BrokenStream(exc)
    log.configure("json", "info", stream=stream)
    logger = log.get_logger()
    logger.warning("written through")
    logger.info("buffered")
    logger.error("also written through")
    log.flush()
    assert stream.attempts >= 1


def test_closed_stream_never_raises() -> None:
    """A closed stream (ValueError on write) never makes logging raise."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    stream.close()
    log.get_logger().warning("into the void")
    log.flush()


def test_reconfigure_flushes_pending_lines_to_the_old_stream(slow_timer: None) -> None:
    """Lines buffered before a reconfigure land on the stream they were logged for."""
    first, second = io.StringIO(), io.StringIO()
    log.configure("json", "info", stream=first)
    log.get_logger().info("before")
    log.configure("json", "info", stream=second)
    log.get_logger().info("after")
    log.flush()
    assert ["before"] == [json.loads(line)["event"] for line in _lines(first)]
    assert ["after"] == [json.loads(line)["event"] for line in _lines(second)]


def test_logger_used_before_reconfigure_follows_it(slow_timer: None) -> None:
    """A logger obtained and used before a reconfigure writes to the new stream afterwards."""
    first, second = io.StringIO(), io.StringIO()
    logger = log.get_logger("assetd.test")
    log.configure("json", "info", stream=first)
    logger.info("one")
    log.configure("json", "info", stream=second)
    logger.info("two")
    log.flush()
    assert ["two"] == [json.loads(line)["event"] for line in _lines(second)]


# --- the grader library inside someone else's program --------------------------------------

LIBRARY_SCRIPT = """
import logging, sys
if sys.argv[1] == "app-configures":
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
from assetd.grader import AssetdBytesProvider, AssetSourceResolver, AssetSpec, PreflightError
provider = AssetdBytesProvider(socket_path="/nonexistent/assetd.sock")
assert provider.get_asset("s3://autograder-assets/k.csv", "/tmp/k.csv") is None
try:
    AssetSourceResolver().resolve_assets([AssetSpec("s3://autograder-assets/k.csv", "/tmp/k")])
except PreflightError:
    pass
"""


def _run_library(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LIBRARY_SCRIPT, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_library_prints_nothing_unless_the_app_configures_logging() -> None:
    """Failing get_asset and pre-flight in a plain program print nothing, stdout or stderr."""
    proc = _run_library("silent")
    assert ("", "") == (proc.stdout, proc.stderr)


def test_library_warnings_reach_the_apps_own_handlers() -> None:
    """With logging configured by the app, the warnings arrive there, under assetd.*, not stdout."""
    proc = _run_library("app-configures")
    lines = proc.stderr.splitlines()
    assert "" == proc.stdout
    assert [
        "WARNING assetd.grader: get_asset /tmp/k.csv <- s3://autograder-assets/k.csv failed:",
        "WARNING assetd.grader: pre-flight failed (job None): /tmp/k: not_allowed",
    ] == [line.split(" unavailable")[0] for line in lines]


@pytest.fixture
def library_mode() -> Iterator[None]:
    """The assetd stdlib logger as in a process that never called configure()."""
    lib = logging.getLogger(log.LIBRARY_LOGGER)
    saved = (lib.handlers[:], lib.propagate, lib.level)
    lib.handlers = [h for h in lib.handlers if isinstance(h, logging.NullHandler)]
    lib.propagate, lib.level = True, logging.NOTSET
    yield
    lib.handlers, lib.propagate, lib.level = saved


def test_library_records_carry_code_and_fields(
    library_mode: None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failed get_asset is one WARNING record on assetd.grader with its fields; stdout empty."""
    from assetd.grader import AssetdBytesProvider

    with caplog.at_level(logging.WARNING, logger="assetd"):
        provider = AssetdBytesProvider(socket_path="/nonexistent/assetd.sock")
        assert provider.get_asset("s3://autograder-assets/k.csv", "/tmp/k.csv") is None
    [record] = caplog.records
    assert ("assetd.grader", logging.WARNING) == (record.name, record.levelno)
    assert {
        "source": "s3://autograder-assets/k.csv",
        "target": "/tmp/k.csv",
        "code": "unavailable",
    } == record.fields  # type: ignore[attr-defined]
    assert ("", "") == capsys.readouterr()


def test_configured_process_renders_library_records_as_json() -> None:
    """After configure() (CLI, daemon), library records become JSON lines in the log stream."""
    stream = io.StringIO()
    log.configure("json", "info", stream=stream)
    logging.getLogger("assetd.grader").warning(
        "pre-flight failed (job %s): %s", "j1", "/tmp/k: not_found", extra={"fields": {"job": "j1"}}
    )
    logging.getLogger("assetd.client").debug("filtered at info")
    log.flush()
    [line] = _lines(stream)
    event = json.loads(line)
    assert {
        "event": "pre-flight failed (job j1): /tmp/k: not_found",
        "job": "j1",
        "logger": "assetd.grader",
        "level": "warning",
    } == {k: event[k] for k in ("event", "job", "logger", "level")}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("GET http://u:p@h:9/x failed", "GET http://***@h:9/x failed"),
        ('{"d":"https://u:a/b@c@host/k"}', '{"d":"https://***@host/k"}'),
        ('{"d":"http://u:a\\"b@host"}', '{"d":"http://***@host"}'),
        ("s3://bucket/a@b.csv", "s3://bucket/a@b.csv"),
        ("http://host/x", "http://host/x"),
    ],
)
def test_redact_urls(line: str, expected: str) -> None:
    """Log lines lose http(s) userinfo whatever the password holds; s3:// sources are kept."""
    assert expected == redact_urls(line)
