"""The fault proxy's rules, against a local origin that serves known bytes."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.faultproxy import FaultProxy


def _payload(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


class _Origin(BaseHTTPRequestHandler):
    """GET /<n> answers n known bytes; keep-alive."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        size = int(self.path.strip("/") or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(_payload(size))


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(origin: int) -> Iterator[FaultProxy]:
    p = FaultProxy(origin).start()
    yield p
    p.stop()


def _conn(proxy: FaultProxy) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(proxy.url.removeprefix("http://"), timeout=10)


def _get(proxy: FaultProxy, path: str) -> tuple[int, bytes]:
    conn = _conn(proxy)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _raw(proxy: FaultProxy, path: str) -> bytes:
    """Everything the proxy sends for one request, until it closes."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        out = b""
        while data := sock.recv(65536):
            out += data
        return out


def _settled(read: Callable[[], int], want: int, within: float = 2.0) -> int:
    """The proxy records after the client has its bytes: poll briefly."""
    deadline = time.monotonic() + within
    while (got := read()) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_corrupt_flips_one_byte_and_keeps_the_length(proxy: FaultProxy) -> None:
    """corrupt=N changes exactly the byte at N; the length is what the origin sent."""
    proxy.add(method="GET", corrupt=70_000)
    status, body = _get(proxy, "/100000")
    want = _payload(100_000)
    assert (200, len(want)) == (status, len(body))
    assert [70_000] == [i for i in range(len(want)) if want[i] != body[i]]


def test_trickled_headers_and_body_arrive_slowly_and_intact(proxy: FaultProxy) -> None:
    """A trickle sends every byte, one per interval: slow, yet the same response."""
    proxy.add(method="GET", trickle_headers=0.002, times=1)
    proxy.add(method="GET", trickle_body=0.02, times=1)
    started = time.monotonic()
    first = _get(proxy, "/10")
    headers_took = time.monotonic() - started
    started = time.monotonic()
    second = _get(proxy, "/20")
    body_took = time.monotonic() - started
    assert (200, _payload(10)) == first
    assert (200, _payload(20)) == second
    assert headers_took >= 0.002 * 40, headers_took  # the status line alone is ~17 bytes
    assert body_took >= 0.02 * 19, body_took
    assert 2 == _settled(lambda: len(proxy.trickle_ended), 2)


def test_trickle_stops_at_its_bound(proxy: FaultProxy) -> None:
    """trickle_max_s ends a trickle the client would otherwise wait out; the proxy closes."""
    proxy.add(method="GET", trickle_body=0.05, trickle_max_s=0.3)
    started = time.monotonic()
    with pytest.raises(http.client.IncompleteRead):
        _get(proxy, "/1000")
    assert time.monotonic() - started < 5
    assert 1 == _settled(lambda: len(proxy.trickle_ended), 1)


def test_longer_content_length_is_a_short_body(proxy: FaultProxy) -> None:
    """length_delta > 0 announces more than is sent: the client sees an incomplete read."""
    proxy.add(method="GET", length_delta=5)
    with pytest.raises(http.client.IncompleteRead):
        _get(proxy, "/100")


def test_shorter_content_length_leaves_extra_bytes(proxy: FaultProxy) -> None:
    """length_delta < 0 announces less than is sent: Content-Length is the lie."""
    proxy.add(method="GET", length_delta=-5)
    raw = _raw(proxy, "/100")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 95" in head
    assert _payload(100) == body


def test_extra_body_follows_the_announced_one(proxy: FaultProxy) -> None:
    """extra_body is sent after a correctly announced body."""
    proxy.add(method="GET", extra_body=b"GARBAGE")
    raw = _raw(proxy, "/100")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in head
    assert _payload(100) + b"GARBAGE" == body


def test_reset_mid_body(proxy: FaultProxy) -> None:
    """reset_after=N sends N body bytes, then a reset."""
    proxy.add(method="GET", reset_after=1000)
    with pytest.raises(ConnectionResetError):
        _get(proxy, "/100000")


def test_status_with_a_non_xml_body(proxy: FaultProxy) -> None:
    """status + body sends that raw body, not S3's XML."""
    proxy.add(method="GET", status=500, body=b"<html>oops</html>")
    assert (500, b"<html>oops</html>") == _get(proxy, "/10")


def test_idle_close_keeps_alive_then_closes_idle_connections(origin: int) -> None:
    """With idle_close, requests share a connection until it idles past the bound."""
    proxy = FaultProxy(origin, idle_close=0.3).start()
    try:
        conn = _conn(proxy)
        for _ in range(2):
            conn.request("GET", "/5")
            assert _payload(5) == conn.getresponse().read()
        assert (1, 0) == (proxy.connections, proxy.idle_closed)
        time.sleep(0.8)
        assert 1 == proxy.idle_closed
        with pytest.raises((http.client.HTTPException, OSError)):
            conn.request("GET", "/5")
            conn.getresponse().read()
        conn.close()
    finally:
        proxy.stop()
