"""The shaping proxy: latency, bandwidth cap, handshake RTT, request counting.

Bounds are one-sided where physics allows (a proxy cannot be faster than its
latency) and generous on the other side: the machine is shared and noisy.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.shapeproxy import Shape, ShapingProxy, ShapingProxyProcess

SLACK = 1.5  # seconds of scheduler noise tolerated above the shaped time


class _Origin(BaseHTTPRequestHandler):
    """GET /<n> answers n bytes of b"x"; PUT reads its body; keep-alive."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        size = int(self.path.strip("/").split("?")[0] or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(b"x" * size)

    do_HEAD = do_GET

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def origin() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    return conn.getresponse().read()


def test_latency_is_added_each_way_and_new_connections_pay_a_round_trip(origin: int) -> None:
    """A new connection costs >= 4 x latency to the first byte, a kept-alive one >= 2 x."""
    latency = 0.05
    with ShapingProxy(("127.0.0.1", origin), Shape(latency_s=latency)) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        started = time.monotonic()
        first = _get(conn, "/10")
        cold = time.monotonic() - started
        started = time.monotonic()
        _get(conn, "/10")
        warm = time.monotonic() - started
        conn.close()
    assert b"x" * 10 == first
    assert 4 * latency * 0.95 <= cold < 4 * latency + SLACK, cold
    assert 2 * latency * 0.95 <= warm < 2 * latency + SLACK, warm
    assert warm < cold


def test_bandwidth_is_capped_per_connection(origin: int) -> None:
    """1 MB through a 2 MB/s connection takes about half a second, and arrives intact."""
    rate, size = 2e6, 1_000_000
    with ShapingProxy(("127.0.0.1", origin), Shape(rate_bps=rate)) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        started = time.monotonic()
        body = _get(conn, f"/{size}")
        took = time.monotonic() - started
        conn.close()
    assert size == len(body)
    expected = size / rate
    assert expected * 0.85 <= took < expected + SLACK, took


def test_requests_are_counted_per_method_and_path_over_keep_alive(origin: int) -> None:
    """GET, HEAD and a PUT with a body on one kept-alive connection are each counted once."""
    with ShapingProxy(("127.0.0.1", origin)) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        _get(conn, "/5?x=1")
        conn.request("HEAD", "/7")
        conn.getresponse().read()
        conn.request("PUT", "/0", body=b"GET /fake HTTP/1.1\r\n\r\n" * 100)
        conn.getresponse().read()
        _get(conn, "/5")
        conn.close()
        time.sleep(0.05)
        counts = dict(proxy.methods())
        assert {"GET": 2, "HEAD": 1, "PUT": 1} == counts
        assert (2, 1, 1) == (proxy.count("GET", "/5"), proxy.count("HEAD"), proxy.connections)


def test_stop_closes_idle_connections_promptly(origin: int) -> None:
    """stop() with a kept-alive idle connection returns fast and the client sees it closed."""
    proxy = ShapingProxy(("127.0.0.1", origin), Shape(latency_s=0.01)).start()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    _get(conn, "/3")
    started = time.monotonic()
    proxy.stop()
    took = time.monotonic() - started
    assert took < 2.0, took
    with pytest.raises((http.client.HTTPException, OSError)):
        _get(conn, "/3")
    assert 0 == proxy.live_connections()


def test_proxy_in_its_own_process_relays_shapes_and_counts(origin: int) -> None:
    """The benchmarks' out-of-process proxy caps bandwidth, counts by path, resets and stops."""
    rate, size = 2e6, 500_000
    with ShapingProxyProcess(("127.0.0.1", origin), Shape(rate_bps=rate)) as proxy:
        port = int(proxy.url.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        started = time.monotonic()
        body = _get(conn, f"/{size}")
        took = time.monotonic() - started
        conn.request("HEAD", "/7")
        conn.getresponse().read()
        conn.close()
        time.sleep(0.05)
        assert (size, {"GET": 1, "HEAD": 1}) == (len(body), dict(proxy.methods()))
        assert {"GET": 1} == dict(proxy.methods(f"/{size}"))
        proxy.reset()
        assert {} == dict(proxy.methods())
        child = proxy._proc
    assert size / rate * 0.85 <= took < size / rate + SLACK, took
    assert child.returncode is not None
