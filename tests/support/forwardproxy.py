"""A small forward HTTP proxy on loopback that counts what goes through it.

What a campus proxy does for a client with ``HTTP_PROXY``/``HTTPS_PROXY``:

- absolute-form requests (``GET http://host:port/path HTTP/1.1``) for http://
  origins: the connection is relayed to that origin, and every request on it
  is counted (S3 engines accept the absolute form, as RFC 9112 requires);
- ``CONNECT host:port`` for https:// origins: a blind tunnel, counted once.

One upstream connection per client connection; threaded; bounded head size;
``stop()`` closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field

from tests.support.shapeproxy import MAX_HEAD, Request, _RequestParser

__all__ = ["ForwardProxy"]


@dataclass
class ForwardProxy:
    """Use as a context manager; ``url`` goes into HTTP_PROXY / HTTPS_PROXY."""

    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _live: set[socket.socket] = field(default_factory=set)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        assert self._listener is not None
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def methods(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for r in self.requests:
                out[r.method] = out.get(r.method, 0) + 1
            return out

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def start(self) -> ForwardProxy:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        threading.Thread(target=self._accept_loop, name="fwd-accept", daemon=True).start()
        return self

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                n = self.connections
                self._live.add(client)
            threading.Thread(target=self._serve, args=(client, n), daemon=True).start()

    def _serve(self, client: socket.socket, n: int) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(4096)
                if not data or len(head) > MAX_HEAD:
                    return
                head += data
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = line.split(" ", 2)
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                self._record(Request(n, method, target, {}, 0.0))
                upstream = socket.create_connection((host, int(port)), timeout=10)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                parser = None
            else:
                origin = urllib.parse.urlsplit(target)
                if not origin.hostname:
                    client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                upstream = socket.create_connection(
                    (origin.hostname, origin.port or 80), timeout=10
                )
                parser = _RequestParser(n, self._record)
                parser.feed(head)
                rest = head
            with self._lock:
                self._live.add(upstream)
            client.settimeout(None)
            upstream.settimeout(None)
            if rest:
                upstream.sendall(rest)
            back = threading.Thread(target=_copy, args=(upstream, client, None), daemon=True)
            back.start()
            _copy(client, upstream, parser)
            back.join(30)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._live.discard(client)
                if upstream is not None:
                    self._live.discard(upstream)
            for s in (client, upstream):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            live = list(self._live)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> ForwardProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _copy(src: socket.socket, dst: socket.socket, parser: _RequestParser | None) -> None:
    """Relay until EOF, then pass the half-close on."""
    try:
        while data := src.recv(65536):
            if parser is not None:
                parser.feed(data)
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
