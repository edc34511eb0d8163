"""A fault-injecting HTTP proxy in front of a loopback S3 server.

Each request is matched against rules in order; the first rule whose
``method`` (and optional ``path`` substring) matches and still has ``times``
left decides what happens:

- ``status``: answer with an S3 error XML (or an empty body for HEAD),
- ``stall``: sleep before answering (a stalled server),
- ``truncate``: forward, but cut the body after N bytes and close,
- ``header``: forward, with one response header replaced,
- ``before``: run a callback, then forward (e.g. replace the object).

Every request is counted by method, so tests can assert "zero GETs".
One request per connection keeps the proxy simple and honest.
"""

from __future__ import annotations

import http.client
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


@dataclass
class FaultProxy:
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

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

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                rule = proxy._match(self.command, self.path)
                self.close_connection = True
                if rule and rule.stall:
                    time.sleep(rule.stall)
                if rule and rule.before:
                    rule.before()
                if rule and rule.status:
                    self._error(rule.status, rule.code)
                    return
                self._forward(body, rule)

            def _error(self, status: int, code: str) -> None:
                payload = (
                    b""
                    if self.command == "HEAD"
                    else (
                        f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                        f"<Message>injected</Message></Error>"
                    ).encode()
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)

            def _forward(self, body: bytes, rule: Rule | None) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() in ("connection", "transfer-encoding"):
                        continue
                    replaced = rule and rule.header and k.lower() == rule.header[0].lower()
                    self.send_header(k, rule.header[1] if replaced else v)  # type: ignore[union-attr]
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                sent = 0
                limit = rule.truncate if rule and rule.truncate is not None else None
                while chunk := resp.read(64 * 1024):
                    if limit is not None and sent + len(chunk) > limit:
                        self.wfile.write(chunk[: limit - sent])
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
