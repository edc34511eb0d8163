"""A fault-injecting HTTP proxy in front of a loopback S3 server.

Each request is matched against rules in order; the first rule whose
``method`` (and optional ``path`` substring) matches and still has ``times``
left decides what happens:

- ``status``: answer with an S3 error XML (or an empty body for HEAD),
- ``stall``: sleep before answering (a stalled server),
- ``truncate``: forward, but cut the body after N bytes and close,
- ``header``: forward, with one response header replaced,
- ``before``: run a callback, then forward (e.g. replace the object),
- ``corrupt``: forward, with the body byte at that offset flipped (same length),
- ``trickle_headers`` / ``trickle_body``: send the status line and headers, or
  the body, one byte every that many seconds (bounded by ``trickle_max_s``),
- ``length_delta``: forward, announcing Content-Length + delta while sending the
  true body (> 0: the body is shorter than announced; < 0: longer),
- ``extra_body``: forward, then send these bytes after the announced body,
- ``reset_after``: forward N body bytes, then reset the connection (RST),
- ``body``: with ``status``, send this raw body instead of S3's XML error.

Every request is counted by method, so tests can assert "zero GETs". By
default one request per connection keeps the proxy simple and honest; with
``idle_close`` set, connections are kept alive and the proxy closes one
that has been idle that many seconds, as S3 servers do.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Rule:
    method: str
    status: int | None = None
    code: str = ""
    stall: float = 0.0
    truncate: int | None = None
    header: tuple[str, str] | None = None
    before: Callable[[], None] | None = None
    times: int = 1_000_000
    path: str = ""
    corrupt: int | None = None
    trickle_headers: float = 0.0
    trickle_body: float = 0.0
    trickle_max_s: float = 60.0
    length_delta: int = 0
    extra_body: bytes = b""
    reset_after: int | None = None
    body: bytes | None = None


@dataclass
class FaultProxy:
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    idle_close: float | None = None  # keep connections alive; close after this idle time
    connections: int = 0  # client connections accepted
    idle_closed: int = 0  # connections the proxy closed for idleness
    trickle_ended: list[float] = field(default_factory=list)  # how long each trickle lasted
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, **kwargs: object) -> Rule:
        rule = Rule(**kwargs)  # type: ignore[arg-type]
        self.rules.append(rule)
        return rule

    def reset(self) -> None:
        with self._lock:
            self.rules.clear()
            self.counts.clear()
            self.connections = self.idle_closed = 0
            self.trickle_ended.clear()

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.counts[method] += 1
            for rule in self.rules:
                if rule.method == method and rule.path in path and rule.times > 0:
                    rule.times -= 1
                    return rule
        return None

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def handle(self) -> None:
                with proxy._lock:
                    proxy.connections += 1
                self.handle_one_request()
                while not self.close_connection and not proxy._stopping.is_set():
                    if proxy.idle_close is not None:
                        ready, _, _ = select.select([self.connection], [], [], proxy.idle_close)
                        if not ready:  # idle too long: close, as the server would
                            with proxy._lock:
                                proxy.idle_closed += 1
                            return
                    self.handle_one_request()

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._match(self.command, self.path)
                self.close_connection = proxy.idle_close is None
                if rule and rule.stall:
                    time.sleep(rule.stall)
                if rule and rule.before:
                    rule.before()
                if rule and rule.status:
                    self._error(rule.status, rule.code, rule.body)
                    return
                self._forward(body, rule)

            def _connection_header(self) -> None:
                if self.close_connection:
                    self.send_header("Connection", "close")

            def _error(self, status: int, code: str, raw: bytes | None) -> None:
                payload = (
                    b""
                    if self.command == "HEAD"
                    else raw
                    if raw is not None
                    else (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected</Message></Error>"
                    ).encode()
                )
                self.send_response(status)
                kind = "text/html" if raw is not None else "application/xml"
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self._connection_header()
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes, rule: Rule | None) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                try:
                    self._relay(resp, rule)
                finally:
                    conn.close()

            def _relay(self, resp: http.client.HTTPResponse, rule: Rule | None) -> None:
                delta = rule.length_delta if rule else 0
                if rule and (delta > 0 or rule.reset_after is not None or rule.trickle_body):
                    self.close_connection = True  # the body will not match what was announced
                if resp.getheader("Content-Length") is None and resp.status not in (204, 304):
                    self.close_connection = True  # a chunked body is relayed raw: end it by closing
                lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
                for k, v in resp.getheaders():
                    if k.lower() in ("connection", "transfer-encoding"):
                        continue
                    value = v
                    if rule and rule.header and k.lower() == rule.header[0].lower():
                        value = rule.header[1]
                    elif delta and k.lower() == "content-length":
                        value = str(int(v) + delta)
                    lines.append(f"{k}: {value}")
                if self.close_connection:
                    lines.append("Connection: close")
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                if rule and rule.trickle_headers:
                    if not self._trickle(head, rule.trickle_headers, rule.trickle_max_s):
                        return
                else:
                    self.wfile.write(head)
                if self.command == "HEAD":
                    return
                self._relay_body(resp, rule)

            def _relay_body(self, resp: http.client.HTTPResponse, rule: Rule | None) -> None:
                sent = 0
                limit = rule.truncate if rule and rule.truncate is not None else None
                reset_at = rule.reset_after if rule else None
                while chunk := resp.read(64 * 1024):
                    if (
                        rule
                        and rule.corrupt is not None
                        and sent <= rule.corrupt < sent + len(chunk)
                    ):
                        flip = bytearray(chunk)
                        flip[rule.corrupt - sent] ^= 0xFF
                        chunk = bytes(flip)
                    if reset_at is not None and sent + len(chunk) >= reset_at:
                        self.wfile.write(chunk[: reset_at - sent])
                        self._reset()
                        return
                    if limit is not None and sent + len(chunk) > limit:
                        self.wfile.write(chunk[: limit - sent])
                        break
                    if rule and rule.trickle_body:
                        if not self._trickle(chunk, rule.trickle_body, rule.trickle_max_s):
                            return
                    else:
                        self.wfile.write(chunk)
                    sent += len(chunk)
                if rule and rule.extra_body:
                    self.wfile.write(rule.extra_body)
                    self.close_connection = True

            def _trickle(self, data: bytes, interval: float, bound: float) -> bool:
                """One byte per ``interval`` until done, the client leaves, or ``bound`` passes."""
                self.close_connection = True
                started = time.monotonic()
                try:
                    for i in range(len(data)):
                        if time.monotonic() - started > bound or proxy._stopping.is_set():
                            return False
                        if i and proxy._stopping.wait(interval):
                            return False
                        self.wfile.write(data[i : i + 1])
                    return True
                except OSError:
                    return False
                finally:
                    with proxy._lock:
                        proxy.trickle_ended.append(time.monotonic() - started)

            def _reset(self) -> None:
                """Close with SO_LINGER 0: the client sees a reset, not a clean end."""
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
