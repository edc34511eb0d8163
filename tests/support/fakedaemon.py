"""A scripted stand-in for the daemon, for client and CLI unit tests."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Callable
from typing import Any

Answer = dict[str, Any] | bytes | None
Script = Callable[[dict[str, Any]], Answer]


class FakeDaemon:
    """A tiny daemon: answers each request line with whatever ``script`` returns.

    ``script(request)`` returns a dict (sent with the request's id and ``ok`` defaulted to
    true), raw bytes (sent as is), or None (never answer: the handler waits until stop).
    """

    def __init__(self, path: str, script: Script, *, close_after_answer: bool = False) -> None:
        self.path = path
        self.script = script
        self.close_after_answer = close_after_answer
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.released = threading.Event()
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake.connections += 1
                for line in self.rfile:
                    request = json.loads(line)
                    fake.requests.append(request)
                    answer = fake.script(request)
                    if answer is None:
                        fake.released.wait(10)
                        return
                    if isinstance(answer, dict):
                        body = {"id": request.get("id"), "ok": True, **answer}
                        answer = json.dumps(body).encode() + b"\n"
                    self.wfile.write(answer)
                    self.wfile.flush()
                    if fake.close_after_answer:
                        return

        self.server = socketserver.ThreadingUnixStreamServer(path, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def start(self) -> FakeDaemon:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> FakeDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
