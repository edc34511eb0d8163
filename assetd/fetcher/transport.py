"""A small HTTP/1.1 client for S3's byte path: keep-alive pool, deadlines, proxies.

Why not http.client or urllib3: a request here must end at its deadline
whatever the server does (a trickle of one byte a second defeats any socket
timeout), a body must be read as it arrives (``recv_into``, never "until
1 MiB is full"), and a pooled connection the server closed while idle must
never be handed out. Those are checks on every ``recv``, so the reading loop
is ours; header parsing is still the standard library's.

Rules:

- every request has a deadline covering connect, headers and body, and a
  stall bound: headers, and then each further 64 KiB of body, must arrive
  within ``read_timeout_s``. Either failure raises :class:`RequestTimeout`
  and the connection is closed.
- a pooled connection is reused only if it has been idle less than
  :data:`IDLE_MAX_S` and the socket shows no EOF or stray bytes.
- a request that fails on a reused connection before any response byte
  arrived is sent again at once on a new connection: the server had closed
  it, nothing was wrong with the request.
- nonsense framing (a Content-Length that is not a plain number, chunked
  where a length is required) raises :class:`BadResponse`.
"""

from __future__ import annotations

import base64
import contextlib
import email.message
import http.client
import io
import select
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IDLE_MAX_S",
    "MIN_PROGRESS",
    "Aborted",
    "BadResponse",
    "Pool",
    "ProxyResolver",
    "RequestTimeout",
    "Response",
]

# Pooled connections idle longer than this are dropped, not reused. Servers
# close idle keep-alive connections after 5 s (Apache's default, several
# S3-compatible engines and load balancers) to 60-75 s (nginx, ELB); staying
# under the lowest common bound means we never race a server's close.
IDLE_MAX_S = 4.0
# A body that delivers less than this within read_timeout_s is stalled.
MIN_PROGRESS = 64 << 10
# How often a blocked read looks at the stop flag (shutdown).
_STOP_POLL_S = 0.5
_MAX_HEADER_LINE = 65536


class RequestTimeout(Exception):
    """The request's deadline passed, or the server stopped sending (stall/trickle)."""


class BadResponse(Exception):
    """Response framing that makes no sense (e.g. a negative Content-Length)."""


class Aborted(Exception):
    """The daemon is shutting down: the request was abandoned."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def netloc(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, request target) of an absolute http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadResponse(f"not an http(s) URL: {parts.scheme}://{parts.hostname}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class ProxyResolver:
    """Which proxy (if any) a request to an origin goes through, as botocore decides.

    ``proxies`` is botocore's ``Config(proxies=...)``; when it is empty the
    environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) applies, like
    ``botocore.utils.get_environ_proxies``.
    """

    def __init__(self, proxies: Mapping[str, str] | None = None) -> None:
        self.configured = dict(proxies or {})
        self._cache: dict[Origin, Origin | None] = {}
        self._auth: dict[Origin, str] = {}

    def proxy_for(self, origin: Origin) -> Origin | None:
        if origin in self._cache:
            return self._cache[origin]
        url = self.configured.get(origin.scheme)
        if url is None and not self.configured:
            env = urllib.request.getproxies()
            url = env.get(origin.scheme)
            with contextlib.suppress(TypeError, OSError):
                if url and urllib.request.proxy_bypass(origin.netloc):
                    url = None
        proxy: Origin | None = None
        if url:
            if "://" not in url:
                url = "http://" + url.removeprefix("//")
            parts = urllib.parse.urlsplit(url)
            if parts.hostname:
                proxy = Origin(
                    parts.scheme or "http",
                    parts.hostname,
                    parts.port or (443 if parts.scheme == "https" else 80),
                )
                if parts.username is not None:
                    user = urllib.parse.unquote(parts.username)
                    password = urllib.parse.unquote(parts.password or "")
                    token = base64.b64encode(f"{user}:{password}".encode()).decode()
                    self._auth[proxy] = f"Basic {token}"
        self._cache[origin] = proxy
        return proxy

    def auth_for(self, proxy: Origin) -> str | None:
        return self._auth.get(proxy)


class _DeadlineRaw(io.RawIOBase):
    """A socket reader that enforces the request's deadline and stall bound on every recv."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        super().__init__()
        self.sock = sock
        self.stop = stop
        self.deadline = float("inf")
        self.read_timeout = 30.0
        self.received = 0
        self._window_start = 0.0
        self._window_bytes = 0
        self._timeout: float | None = None

    def arm(self, deadline: float, read_timeout: float) -> None:
        self.deadline = deadline
        self.read_timeout = read_timeout
        self.received = 0
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def restart_window(self) -> None:
        """The stall bound counts from now: the time before was ours, not the server's."""
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def forget_timeout(self) -> None:
        """Someone else set the socket's timeout: set ours again before the next recv."""
        self._timeout = None

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                raise RequestTimeout("deadline passed while reading the response")
            if now - self._window_start >= self.read_timeout:
                if self._window_bytes < MIN_PROGRESS:
                    raise RequestTimeout(
                        f"server sent {self._window_bytes} bytes in {self.read_timeout:g} s"
                    )
                self._window_start, self._window_bytes = now, 0
            if self.stop.is_set():
                raise Aborted("shutting down")
            wait = min(self.deadline, self._window_start + self.read_timeout) - now
            timeout = max(0.001, min(wait, _STOP_POLL_S))
            if timeout != self._timeout:  # settimeout costs two fcntl calls: skip repeats
                self.sock.settimeout(timeout)
                self._timeout = timeout
            try:
                n = self.sock.recv_into(b)
            except TimeoutError:
                continue
            self.received += n
            self._window_bytes += n
            return n


class Connection:
    """One socket, used by one request at a time."""

    def __init__(
        self, sock: socket.socket, key: tuple[Origin, Origin | None], stop: threading.Event
    ):
        self.sock = sock
        self.key = key
        self.raw = _DeadlineRaw(sock, stop)
        self.fp = io.BufferedReader(self.raw, 64 << 10)
        self.idle_since = time.monotonic()
        self.reused = False
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    def shutdown(self) -> None:
        """Unblock a reader in another thread (shutdown of the daemon)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def usable(self, now: float) -> bool:
        """Idle briefly, and the server has neither closed it nor sent stray bytes."""
        if self.closed or now - self.idle_since > IDLE_MAX_S:
            return False
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return False
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False


class Response:
    """Status and headers of one response; the body is read with :meth:`readinto`."""

    def __init__(
        self,
        pool: Pool,
        conn: Connection,
        method: str,
        *,
        status: int,
        reason: str,
        headers: email.message.Message,
        will_close: bool,
    ) -> None:
        self._pool = pool
        self._conn: Connection | None = conn
        self.method = method
        self.status = status
        self.reason = reason
        self.headers = headers
        self._will_close = will_close
        self.length = self._body_length()
        self.remaining = self.length if self.length is not None else -1
        self._body_started = False

    def header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)

    def _body_length(self) -> int | None:
        if self.method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            return 0
        if self.header("Transfer-Encoding"):
            return None  # only error bodies may be chunked: read what arrives, then close
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return None
        if len(set(values)) != 1 or not _digits(str(values[0]).strip()):
            raise BadResponse(f"invalid Content-Length {values!r}")
        return int(str(values[0]).strip())

    def set_deadline(self, deadline: float, read_timeout: float) -> None:
        """A response read by another request than the one that sent it (revalidation)."""
        if self._conn is not None:
            self._conn.raw.deadline = deadline
            self._conn.raw.read_timeout = read_timeout

    def readinto(self, buf: memoryview) -> int:
        """Up to ``len(buf)`` bytes of body, at most one recv; 0 at the end of the body."""
        if self._conn is None or self.remaining == 0:
            return 0
        if self.remaining > 0 and len(buf) > self.remaining:
            buf = buf[: self.remaining]
        if not self._body_started:
            # the body may be read long after the headers (room reserved, a queued
            # revalidation answer): that wait is not the server stalling
            self._body_started = True
            self._conn.raw.restart_window()
        try:
            n = self._conn.fp.readinto1(buf)
        except BaseException:
            self.close()
            raise
        if n == 0:
            if self.remaining > 0:
                self.close()
                raise ConnectionError(f"connection closed with {self.remaining} bytes unread")
            self.remaining = 0
            self.close()
            return 0
        if self.remaining > 0:
            self.remaining -= n
            if self.remaining == 0:
                self.release()
        return n

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of body (error documents); the connection is kept if it ended."""
        out = bytearray()
        buf = memoryview(bytearray(16 << 10))
        while len(out) < limit:
            n = self.readinto(buf[: limit - len(out)])
            if not n:
                break
            out += buf[:n]
            if self.length is None:
                break  # unframed: take what arrived, the connection is closed below
        if self.remaining != 0:
            self.close()
        return bytes(out)

    def release(self) -> None:
        """Back to the pool if the body was read to its end, else close."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.remaining == 0 and not self._will_close:
            self._pool.put(conn)
        else:
            self._pool.discard(conn)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.discard(conn)


SSLContextFactory = Callable[[], ssl.SSLContext]


class Pool:
    """Keep-alive connections per (origin, proxy); see the module docstring for the rules."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: SSLContextFactory,
        proxies: ProxyResolver | None = None,
        max_idle: int = 32,
        stop: threading.Event | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl_context = ssl_context
        self.proxies = proxies or ProxyResolver()
        self.max_idle = max_idle
        self.stop = stop or threading.Event()
        self._idle: dict[tuple[Origin, Origin | None], list[Connection]] = {}
        self._busy: set[Connection] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.opened = 0  # connections made
        self.stale_retries = 0  # requests sent again after a reused connection had died

    # -- pool bookkeeping --------------------------------------------------------

    def _take(self, key: tuple[Origin, Origin | None]) -> Connection | None:
        now = time.monotonic()
        stale: list[Connection] = []
        found: Connection | None = None
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()  # most recently used first: least likely to be closed
                if conn.usable(now):
                    found = conn
                    self._busy.add(conn)
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        if found is not None:
            found.reused = True
        return found

    def put(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            self._busy.discard(conn)
            idle = self._idle.setdefault(conn.key, [])
            if not self._closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def discard(self, conn: Connection) -> None:
        with self._lock:
            self._busy.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close idle connections; busy ones close when their request ends."""
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()

    def abort(self) -> None:
        """Shutdown: wake every blocked reader and close every connection."""
        self.stop.set()
        with self._lock:
            busy = list(self._busy)
        for conn in busy:
            conn.shutdown()
        self.close()

    # -- connecting ----------------------------------------------------------------

    def _connect(self, origin: Origin, proxy: Origin | None, deadline: float) -> Connection:
        hop = proxy or origin
        timeout = min(self.connect_timeout, deadline - time.monotonic())
        if timeout <= 0:
            raise RequestTimeout("deadline passed before connecting")
        # a connect timeout stays a TimeoutError: retryable, unlike a stalled answer
        sock = socket.create_connection((hop.host, hop.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, (origin, proxy), self.stop)
        try:
            if proxy is not None and proxy.scheme == "https":
                raise BadResponse("an https:// proxy is not supported; use http://")
            if proxy is not None and origin.scheme == "https":
                self._tunnel(conn, origin, proxy, deadline)
            if origin.scheme == "https":
                ctx = self._ssl_context()
                conn.sock.settimeout(
                    max(0.001, min(self.connect_timeout, deadline - time.monotonic()))
                )
                tls = ctx.wrap_socket(conn.sock, server_hostname=origin.host)
                conn = Connection(tls, (origin, proxy), self.stop)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._busy.add(conn)
            self.opened += 1
        return conn

    def _tunnel(self, conn: Connection, origin: Origin, proxy: Origin, deadline: float) -> None:
        lines = [
            f"CONNECT {origin.host}:{origin.port} HTTP/1.1",
            f"Host: {origin.host}:{origin.port}",
        ]
        auth = self.proxies.auth_for(proxy)
        if auth:
            lines.append(f"Proxy-Authorization: {auth}")
        conn.raw.arm(deadline, self.read_timeout)
        conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        # read byte by byte up to the blank line: nothing of the TLS stream is buffered away
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            one = bytearray(1)
            if not conn.raw.readinto(memoryview(one)):
                raise ConnectionError("proxy closed the connection during CONNECT")
            head += one
            if len(head) > _MAX_HEADER_LINE:
                raise BadResponse("proxy CONNECT answer too long")
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or status[1] != b"200":
            raise ConnectionError(f"proxy refused CONNECT: {head.splitlines()[0]!r}")

    # -- requests ------------------------------------------------------------------

    def request(
        self, method: str, url: str, headers: Mapping[str, str], deadline: float
    ) -> Response:
        """Send one request and read its status and headers."""
        origin, target = split_url(url)
        proxy = self.proxies.proxy_for(origin)
        key = (origin, proxy)
        if proxy is not None and origin.scheme == "http":
            target = f"http://{origin.netloc}{target}"  # a forward proxy takes the full URL
        while True:
            if self.stop.is_set():
                raise Aborted("shutting down")
            conn = self._take(key)
            if conn is None:
                conn = self._connect(origin, proxy, deadline)
            try:
                return self._send(
                    conn, method, origin=origin, target=target, headers=headers, deadline=deadline
                )
            except (RequestTimeout, Aborted, BadResponse):
                self.discard(conn)
                raise
            except (OSError, http.client.HTTPException):
                self.discard(conn)
                if conn.reused and conn.raw.received == 0:
                    self.stale_retries += 1
                    continue  # the server closed it while idle: at once, on a new connection
                raise
            except BaseException:
                self.discard(conn)  # never left in _busy with its socket open
                raise

    def _send(
        self,
        conn: Connection,
        method: str,
        *,
        origin: Origin,
        target: str,
        headers: Mapping[str, str],
        deadline: float,
    ) -> Response:
        conn.raw.arm(deadline, self.read_timeout)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.netloc}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        proxy = conn.key[1]
        if proxy is not None and origin.scheme == "http":
            auth = self.proxies.auth_for(proxy)
            if auth:
                lines.append(f"Proxy-Authorization: {auth}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RequestTimeout("deadline passed before sending")
        conn.sock.settimeout(max(0.001, min(self.read_timeout, remaining)))
        try:
            conn.sock.sendall(data)
        except TimeoutError as exc:
            raise RequestTimeout("send timed out") from exc
        finally:
            conn.raw.forget_timeout()
        while True:
            line = conn.fp.readline(_MAX_HEADER_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("connection closed before a response")
            if len(line) > _MAX_HEADER_LINE:
                raise BadResponse("status line too long")
            version, status, reason = _status_line(line)
            message = http.client.parse_headers(conn.fp)
            if status != 100:
                break
        will_close = (message.get("Connection", "") or "").lower() == "close" or (
            version == "HTTP/1.0" and (message.get("Connection", "") or "").lower() != "keep-alive"
        )
        return Response(
            self, conn, method, status=status, reason=reason, headers=message, will_close=will_close
        )


def _status_line(line: bytes) -> tuple[str, int, str]:
    parts = line.decode("iso-8859-1").rstrip("\r\n").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not _digits(parts[1]):
        raise BadResponse(f"bad status line {line[:80]!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""


def _digits(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also takes a superscript two, which int() refuses."""
    return text.isascii() and text.isdigit()
