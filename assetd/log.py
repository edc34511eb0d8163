"""Logging: structlog, JSON lines to stderr, or the console renderer on a TTY.

Events carry fields, never secrets: nothing here or upstream logs a
credential, a presigned URL or a request signature.

Two worlds:

- the daemon and the CLI call :func:`configure`: structlog renders every
  event to stderr (stdout is a command's answer);
- the grader library (:mod:`assetd.grader`, :mod:`assetd.client`) runs in
  someone else's process and logs through the stdlib logger ``assetd`` and
  its children. ``assetd`` carries a ``NullHandler``, so nothing is printed
  unless the host application configures logging; records propagate to its
  handlers like any library's. Once :func:`configure` has run, those
  records go to the structlog sink instead (with their ``fields`` extra).

Info and debug lines are buffered and flushed every ``FLUSH_EVERY_S`` (and
at exit): one ``write`` per resolve would cost the hit path more than the
resolve itself. Warnings and errors are written through at once.
"""

from __future__ import annotations

import atexit
import logging
import re
import sys
import threading
from typing import Any, TextIO

import structlog

__all__ = ["LIBRARY_LOGGER", "configure", "flush", "get_logger", "redact_urls"]

LIBRARY_LOGGER = "assetd"

# userinfo of an http(s) URL, up to the token's LAST "@": a password may hold
# "/", "@", ":" or an escaped quote, and none of it may reach a log line
_USERINFO = re.compile(r"(https?://)(?:[^\s\"'\\]|\\.)*@", re.IGNORECASE)


def redact_urls(text: str) -> str:
    """``text`` with the userinfo of every http(s) URL replaced by ``***``."""
    return _USERINFO.sub(r"\1***@", text)


FLUSH_EVERY_S = 0.2
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _Sink:
    """Collects rendered lines; a timer thread writes them out in batches."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()
        self.pending: list[str] = []
        self.stop = threading.Event()
        threading.Thread(target=self._loop, name="assetd-log", daemon=True).start()
        atexit.register(self.flush)

    def add(self, line: str, urgent: bool) -> None:
        with self.lock:
            self.pending.append(line)
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            lines, self.pending = self.pending, []
            if lines:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr gone (closed pipe): logging must never take the daemon down

    def _loop(self) -> None:
        while not self.stop.wait(FLUSH_EVERY_S):
            self.flush()


class _Logger:
    """The structlog "logger": routes rendered lines to the current sink by level.

    The sink is looked up per line, so loggers that structlog cached before
    a reconfigure still follow it.
    """

    def _plain(self, message: str) -> None:
        if _sinks:
            if "@" in message and "://" in message:
                message = redact_urls(message)
            _sinks[0].add(message + "\n", urgent=False)

    def _urgent(self, message: str) -> None:
        if _sinks:
            if "@" in message and "://" in message:
                message = redact_urls(message)
            _sinks[0].add(message + "\n", urgent=True)

    debug = info = msg = _plain
    warning = warn = error = err = critical = exception = fatal = _urgent


_sinks: list[_Sink] = []  # the current sink, if configured


class _ToStructlog(logging.Handler):
    """Sends the library's stdlib records to structlog once the process is ours (CLI, daemon)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = getattr(record, "fields", None)
            kw: dict[str, Any] = dict(fields) if isinstance(fields, dict) else {}
            kw.setdefault("logger", record.name)
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            method = record.levelname.lower() if record.levelno < logging.CRITICAL else "critical"
            getattr(structlog.get_logger(record.name), method)(record.getMessage(), **kw)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def _route_library_logs(level: int) -> None:
    lib = logging.getLogger(LIBRARY_LOGGER)
    for handler in [h for h in lib.handlers if isinstance(h, _ToStructlog)]:
        lib.removeHandler(handler)
    lib.addHandler(_ToStructlog())
    lib.setLevel(level)
    lib.propagate = False  # this process has no other handlers to feed


def configure(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Set up structlog once for the process; ``fmt`` is auto, json or console."""
    stream = sys.stderr if stream is None else stream
    console = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    flush()
    for old in _sinks:
        old.stop.set()
    _sinks[:] = [_Sink(stream)]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _Logger(),
        cache_logger_on_first_use=True,
    )
    _route_library_logs(_LEVELS[level])


def flush() -> None:
    """Write out buffered lines now (shutdown, tests)."""
    for sink in _sinks:
        sink.flush()


def get_logger(name: str = "assetd") -> Any:
    return structlog.get_logger(name)
