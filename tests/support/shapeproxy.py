"""A traffic-shaping TCP proxy on loopback: a WAN between a client and a local S3.

Loopback has no latency and no per-connection bandwidth limit; real S3 has
both, and that is what decides whether parallel ranged GETs pay off. Each
accepted connection is relayed to the upstream with, per direction:

- ``latency_s`` added to every chunk (pipelined, like a real link: latency
  does not reduce throughput by itself);
- a token bucket capping each connection at ``rate_bps`` bytes per second;
- one extra round trip (2 x latency) charged before a new connection carries
  data, as a TCP handshake costs.

It also parses the HTTP request lines on the client→server stream (keep-alive
and pipelining included), so tests can count GET/HEAD requests per object and
see their headers. Bounded: at most ``max_connections`` live connections, at
most ``QUEUE_CHUNKS`` chunks buffered per direction. Threaded; ``stop()``
closes every socket and joins every thread.

Benchmarks run it in a process of its own (``ShapingProxyProcess``): in the
measured process its relay threads would take the GIL from the Python client
under test, which no real network does.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PROFILES", "Request", "Shape", "ShapingProxy", "ShapingProxyProcess"]

CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # per direction: at most 4 MiB in flight inside the proxy
BURST = 64 * 1024  # token bucket depth
MAX_HEAD = 64 * 1024
MAX_RECORDED = 10_000


@dataclass(frozen=True, slots=True)
class Shape:
    """One network profile: latency each way, per-connection cap (bytes/s), handshake RTT."""

    latency_s: float = 0.0
    rate_bps: float | None = None
    connect_rtt: bool = True


# MB is 10^6 bytes, as link speeds are quoted.
PROFILES: dict[str, Shape] = {
    "loopback": Shape(),
    "wan": Shape(latency_s=0.010, rate_bps=40e6),
    "far": Shape(latency_s=0.040, rate_bps=80e6),
}


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request seen on the client→server stream."""

    conn: int
    method: str
    target: str
    headers: dict[str, str]
    at: float

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class _Bucket:
    """A token bucket; ``send`` blocks until the bytes fit under the rate."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.tokens = float(BURST)
        self.last = time.monotonic()

    def send(self, sock: socket.socket, data: bytes) -> None:
        if self.rate is None:
            sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            piece = view[:BURST]
            now = time.monotonic()
            self.tokens = min(float(BURST), self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens < len(piece):
                time.sleep((len(piece) - self.tokens) / self.rate)
                continue
            self.tokens -= len(piece)
            sock.sendall(piece)
            view = view[len(piece) :]


class _RequestParser:
    """Finds request heads in a client byte stream; skips Content-Length and chunked bodies."""

    def __init__(self, conn: int, record: Callable[[Request], None]) -> None:
        self.conn = conn
        self.record = record
        self.buf = bytearray()
        self.state = "head"
        self.remaining = 0
        self.broken = False

    def feed(self, data: bytes) -> None:  # noqa: PLR0912 - a small state machine
        if self.broken:
            return
        self.buf += data
        while self.buf:
            if self.state in ("body", "chunk-data"):
                take = min(self.remaining, len(self.buf))
                del self.buf[:take]
                self.remaining -= take
                if self.remaining:
                    return
                self.state = "head" if self.state == "body" else "chunk-size"
            elif self.state == "head":
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    self.broken = len(self.buf) > MAX_HEAD
                    return
                head = bytes(self.buf[:end]).decode("latin-1")
                del self.buf[: end + 4]
                self._head(head)
            elif self.state == "chunk-size":
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(self.buf[:end]).split(b";", 1)[0].strip()
                del self.buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    self.broken = True
                    return
                if size:
                    self.state, self.remaining = "chunk-data", size + 2
                else:
                    self.state = "trailer"
            else:  # trailer: lines until an empty one
                end = self.buf.find(b"\r\n")
                if end < 0:
                    return
                empty = end == 0
                del self.buf[: end + 2]
                if empty:
                    self.state = "head"

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self.broken = True
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.record(Request(self.conn, parts[0], parts[1], headers, time.monotonic()))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
            return
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self.broken = True
            return
        if length > 0:
            self.state, self.remaining = "body", length


@dataclass
class ShapingProxy:
    """Relay 127.0.0.1:<port> to ``upstream`` through ``shape``; use as a context manager."""

    upstream: tuple[str, int]
    shape: Shape = field(default_factory=Shape)
    max_connections: int = 256
    server_ssl: ssl.SSLContext | None = None  # set: clients speak TLS to the proxy (https://)
    connections: int = 0  # accepted since start (or the last reset)
    requests: list[Request] = field(default_factory=list)
    _listener: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _live: set[socket.socket] = field(default_factory=set)
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests seen with this method (any if None) whose path contains ``path``."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if (method is None or r.method == method) and path in r.path
            )

    def methods(self, path: str = "") -> Counter[str]:
        """Requests per method whose path contains ``path``."""
        with self._lock:
            return Counter(r.method for r in self.requests if path in r.path)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.connections = 0

    def live_connections(self) -> int:
        with self._lock:
            return len(self._live) // 2

    def _record(self, request: Request) -> None:
        with self._lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append(request)

    def start(self) -> ShapingProxy:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self._spawn(self._accept_loop, "shape-accept")
        return self

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        n = 0
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._live) // 2 >= self.max_connections
                if not full:
                    self.connections += 1
            if full:
                client.close()
                continue
            n += 1
            self._spawn(self._serve, f"shape-conn-{n}", client, n)

    def _serve(self, client: socket.socket, n: int) -> None:
        if self.server_ssl is not None:
            try:
                client.settimeout(10)
                client = self.server_ssl.wrap_socket(client, server_side=True)
                client.settimeout(None)
            except OSError:
                client.close()
                return
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._live.update((client, upstream))
        if self.shape.connect_rtt and self.shape.latency_s:
            # the handshake's round trip: nothing moves before it is over
            self._stopping.wait(2 * self.shape.latency_s)
        parser = _RequestParser(n, self._record)
        done = threading.Barrier(2, action=lambda: self._close(client, upstream))
        self._spawn(self._pump, f"shape-c2s-{n}", client, upstream, parser, done)
        self._pump(upstream, client, None, done)

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._live.discard(s)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        parser: _RequestParser | None,
        done: threading.Barrier,
    ) -> None:
        bucket = _Bucket(self.shape.rate_bps)
        latency = self.shape.latency_s
        reset = False
        try:
            if latency <= 0:
                reset = self._relay_direct(src, dst, parser, bucket)
            else:
                reset = self._relay_delayed(src, dst, parser, bucket, latency)
        finally:
            if reset:
                _abort(dst)
            elif isinstance(dst, ssl.SSLSocket):
                # no TLS half-close: end both directions (SSLSocket.shutdown drops the TLS layer)
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(dst, socket.SHUT_RDWR)
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait(timeout=600)

    def _relay_direct(
        self,
        src: socket.socket,
        dst: socket.socket,
        parser: _RequestParser | None,
        bucket: _Bucket,
    ) -> bool:
        """Copy until EOF; True if either side was reset."""
        try:
            while data := src.recv(CHUNK):
                if parser is not None:
                    parser.feed(data)
                bucket.send(dst, data)
        except OSError:
            return True
        return False

    def _relay_delayed(
        self,
        src: socket.socket,
        dst: socket.socket,
        parser: _RequestParser | None,
        bucket: _Bucket,
        latency: float,
    ) -> bool:
        line: queue.Queue[tuple[float, bytes | None]] = queue.Queue(QUEUE_CHUNKS)
        failed = threading.Event()

        def deliver() -> None:
            while True:
                due, data = line.get()
                if data is None:
                    return
                if failed.is_set():
                    continue  # drain, so the reader never blocks on a full line
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    bucket.send(dst, data)
                except OSError:
                    failed.set()
                    with contextlib.suppress(OSError):
                        src.shutdown(socket.SHUT_RD)  # wake the reader

        writer = threading.Thread(target=deliver, name="shape-deliver", daemon=True)
        writer.start()
        reset = False
        try:
            while not failed.is_set():
                data = src.recv(CHUNK)
                if not data:
                    break
                if parser is not None:
                    parser.feed(data)
                line.put((time.monotonic() + latency, data))
        except OSError:
            reset = True
        finally:
            line.put((time.monotonic() + latency, None))
            writer.join()
        return reset or failed.is_set()

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() does not
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            live = list(self._live)
            threads = list(self._threads)
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)
        self._close(*live)

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _abort(sock: socket.socket) -> None:
    """Pass a reset on: SO_LINGER 0 makes the coming close() send RST, not FIN.

    SHUT_RD wakes the other direction's pump, which is blocked reading this socket.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)


_REPO = str(Path(__file__).resolve().parents[2])


def _shape_dict(shape: Shape) -> dict[str, object]:
    return {
        "latency_s": shape.latency_s,
        "rate_bps": shape.rate_bps,
        "connect_rtt": shape.connect_rtt,
    }


class ShapingProxyProcess:
    """A ``ShapingProxy`` in a child process, with its request counts a line away.

    The child reads commands on stdin (``methods <path>``, ``reset``) and
    answers each with one JSON line; stdin's end stops it.
    """

    def __init__(self, upstream: tuple[str, int], shape: Shape) -> None:
        spec = json.dumps({"upstream": list(upstream), **_shape_dict(shape)})
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.shapeproxy", spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=_REPO,
        )
        assert self._proc.stdout is not None
        self.url = self._proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"shaping proxy did not start: {self.url!r}")

    def _ask(self, line: str) -> object:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return json.loads(self._proc.stdout.readline())

    def methods(self, path: str = "") -> Counter[str]:
        """Requests per method whose path contains ``path``."""
        got = self._ask(f"methods {path}")
        assert isinstance(got, dict)
        return Counter(got)

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self._proc.stdin is not None:
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ShapingProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    host, port = spec.pop("upstream")
    with ShapingProxy((host, int(port)), Shape(**spec)) as proxy:
        print(proxy.url, flush=True)
        for line in sys.stdin:
            command, _, arg = line.rstrip("\n").partition(" ")
            if command == "methods":
                print(json.dumps(dict(proxy.methods(arg))), flush=True)
            elif command == "reset":
                proxy.reset()
                print("null", flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1])
