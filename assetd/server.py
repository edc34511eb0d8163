"""The daemon: protocol v1 on a Unix socket, in front of the core service.

One asyncio event loop owns every connection. A fresh cache hit is answered
on the loop itself (dict lookups and one ``stat``), so hits never wait for a
thread. Anything that may block, a miss, a revalidation, ``stats`` or a
prefetch, runs on a bounded thread pool, and answers go back in request
order per connection. Fetches run on the service's own pool, one download
per object (single-flight).

Signals: SIGTERM/SIGINT stop accepting, let in-flight requests finish within
the grace period, then fail what is left with a clean error. SIGHUP reloads
the allowlists and limits without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import signal
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from assetd import __version__, systemd
from assetd.background import Background
from assetd.catalog import catalog_path, load_catalog
from assetd.config import Config, load_config
from assetd.errors import (
    AssetError,
    BadRequest,
    ConfigError,
    Forbidden,
    InternalError,
    Timeout,
    Unavailable,
)
from assetd.log import flush as flush_logs
from assetd.log import get_logger
from assetd.metrics import Metrics, PrometheusExport
from assetd.protocol import (
    MAX_LINE,
    Request,
    Resolved,
    decode_request,
    encode,
    encode_resolved,
    error_response,
    ok_response,
    peek_id,
)
from assetd.service import AssetService
from assetd.watch import Watcher

__all__ = ["Daemon", "bind_socket"]

log = get_logger("assetd.server")
_PEERCRED = struct.Struct("3i")
MAINTENANCE_OPS = frozenset({"gc", "verify"})
FLUSH_EVERY_S = 1.0
EVICT_EVERY_TICKS = 30  # flushes between checks of the limits outside a fetch
PREFETCH_CONCURRENCY = 4  # entries of one prefetch request resolved at once
EXPIRE_EVERY_S = 1.0  # how often idle and slow connections are looked for


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: it cuts the per-request loop overhead to a fraction."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def bind_socket(path: str, mode: int, group: str | None) -> socket.socket:
    """Listen on ``path``, replacing a stale socket file but nothing else."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"daemon.socket: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listening: left behind by a crash
        else:
            raise ConfigError(f"daemon.socket: another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window in which the socket is wider than asked
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            os.unlink(path)
            raise ConfigError(f"daemon.socket_group: no group named {group!r}") from None
        os.chown(path, -1, gid)
    sock.listen(1024)
    return sock


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_GID = struct.Struct("=I")


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups, from the kernel as they were at connect.

    Never from /proc/<pid>: by the time we read it the pid may name another
    process. An empty set when the kernel cannot tell (then only uid and
    primary gid count).
    """
    for size in (256, 65536):  # NGROUPS_MAX is 65536; few peers have more than 256
        try:
            if size * _GID.size <= 1024:
                raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * _GID.size)
            else:  # Python's getsockopt refuses buffers over 1024 bytes: ask libc directly
                raw = _getsockopt_raw(sock.fileno(), SO_PEERGROUPS, size * _GID.size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return frozenset()
        return frozenset(g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))
    return frozenset()


def _getsockopt_raw(fd: int, option: int, size: int) -> bytes:
    """``getsockopt(fd, SOL_SOCKET, option)`` into a buffer of ``size`` bytes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if libc.getsockopt(fd, socket.SOL_SOCKET, option, buf, ctypes.byref(length)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buf.raw[: length.value]


class _Throttled:
    """A warning that a flood of peers could repeat: at most one line per interval.

    The lines left out are counted and reported with the next one, so a
    client that opens connections in a loop cannot grow the log without bound.
    """

    def __init__(self, event: str, every_s: float = 10.0) -> None:
        self.event = event
        self.every_s = every_s
        self.next_at = 0.0
        self.suppressed = 0

    def warn(self, **fields: Any) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        self.next_at = now + self.every_s
        if self.suppressed:
            fields["suppressed"] = self.suppressed
            self.suppressed = 0
        log.warning(self.event, **fields)


class _Connection(asyncio.Protocol):
    """One client. Reading stops while the client owes us a read.

    Two things stop reading, and both are needed: ``max_pipelined`` answers
    owed (requests waiting on a worker, and the hits queued behind them),
    and more than ``max_unsent_bytes`` written but not yet taken by the
    client (asyncio's ``pause_writing``). A client that never reads thus
    costs at most a line, its owed answers and the unsent bytes, and no
    more requests are handled (or logged) for it until it reads.
    """

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.buf = bytearray()
        self.owed: deque[asyncio.Future[bytes]] = deque()
        self.transport: asyncio.Transport | None = None
        self.allowed = True
        self.peer = (0, -1, -1)  # pid, uid, gid from SO_PEERCRED
        self.groups: Callable[[], frozenset[int]] = frozenset
        self.closing = False
        self.reading = True  # False while we paused the transport
        self.write_paused = False  # the transport's buffer is above max_unsent_bytes
        self.write_paused_at = 0.0
        self.last_active = daemon.loop.time()
        self.line_started: float | None = None  # first byte of an unfinished line

    # -- transport callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.transport = stream
        daemon = self.daemon
        if len(daemon.connections) >= daemon.config.daemon.max_connections:
            daemon.refuse_over_limit(stream)
            self.closing = True
            return
        daemon.connections.add(self)
        limit = daemon.config.daemon.max_unsent_bytes
        stream.set_write_buffer_limits(high=limit, low=limit // 4)
        sock = transport.get_extra_info("socket")
        try:
            pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            pid, uid, gid = 0, -1, -1
        self.peer = (pid, uid, gid)
        self.groups = lambda: peer_groups(sock)
        self.allowed = daemon.peer_allowed(uid, gid, self.groups)
        if not self.allowed:
            daemon.refused_peer.warn(pid=pid, uid=uid, gid=gid)

    def connection_lost(self, exc: Exception | None) -> None:
        self.daemon.connections.discard(self)
        self.closing = True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.daemon.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = self.daemon.loop.time()
        self.buf += data
        self._pump()

    def eof_received(self) -> bool:
        # half-close: answer what was already asked, then close (in _drain)
        self.closing = True
        self._drain()
        return True

    def _pump(self) -> None:
        """Handle the buffered lines while the client keeps up; pause reading when it does not."""
        transport = self.transport
        if transport is None:
            return
        limit = self.daemon.config.daemon.max_pipelined
        while not self.closing:
            if self.write_paused or len(self.owed) >= limit:
                if self.reading and not transport.is_closing():
                    transport.pause_reading()
                    self.reading = False
                self.line_started = None  # our pause holds the line up; its clock restarts after
                return
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_LINE:
                    self._fatal(BadRequest(f"request line longer than {MAX_LINE} bytes"))
                    return
                break
            if nl > MAX_LINE:
                self._fatal(BadRequest(f"request line longer than {MAX_LINE} bytes"))
                return
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            self.line_started = None
            try:
                self._handle(line)
            except Exception as exc:  # a bug: answer internal, keep the connection and the daemon
                log.exception("request failed")
                self.daemon.count_error("internal")
                self._answer_now(
                    error_response(
                        peek_id(line), InternalError("internal error in assetd", detail=repr(exc))
                    )
                )
        if self.buf and self.line_started is None:
            self.line_started = self.daemon.loop.time()
        if not self.reading and not self.closing and not transport.is_closing():
            transport.resume_reading()
            self.reading = True

    def expire(self, now: float) -> None:
        """Close this connection if it is idle, slow to finish a line, or not reading."""
        if self.closing or self.transport is None:
            return
        cfg = self.daemon.config.daemon
        if self.line_started is not None and now - self.line_started > cfg.line_timeout_s:
            self.daemon.slow_line.warn(timeout_s=cfg.line_timeout_s)
            self._fatal(BadRequest(f"request line not finished within {cfg.line_timeout_s:g}s"))
        elif self.write_paused and now - self.write_paused_at > cfg.idle_timeout_s:
            self.daemon.stalled.warn(timeout_s=cfg.idle_timeout_s)
            self.closing = True
            self.transport.abort()  # it reads nothing: what is unsent can go
        elif not self.owed and not self.buf and now - self.last_active > cfg.idle_timeout_s:
            self.closing = True
            self.transport.close()  # quietly: a client reconnects when it needs us again

    # -- answers, in request order ------------------------------------------

    def _owe(self, future: asyncio.Future[bytes]) -> None:
        self.owed.append(future)
        future.add_done_callback(lambda _f: self._drain())

    def _answer_now(self, message: dict[str, Any]) -> None:
        self._write_now(encode(message))

    def _write_now(self, data: bytes) -> None:
        if not self.owed and self.transport is not None:
            # nothing owed before it: write now rather than a loop turn later
            if not self.transport.is_closing():
                self.transport.write(data)
            if self.closing:
                self.transport.close()
            return
        future = self.daemon.loop.create_future()
        future.set_result(data)
        self._owe(future)

    def _drain(self) -> None:
        transport = self.transport
        if self.owed and self.owed[0].done():
            self.last_active = self.daemon.loop.time()  # idle counts from the last answer too
        while self.owed and self.owed[0].done():
            future = self.owed.popleft()
            if transport is not None and not transport.is_closing() and not future.cancelled():
                transport.write(future.result())
        if self.closing and not self.owed and transport is not None:
            transport.close()
        elif not self.reading:
            self._pump()

    def _fatal(self, err: AssetError) -> None:
        """Answer one last error, then close: the stream can no longer be trusted."""
        self.daemon.count_error("bad_request" if isinstance(err, BadRequest) else err.code)
        self._answer_now(error_response(None, err))
        self.closing = True
        self.buf.clear()
        self.line_started = None
        self._drain()

    # -- requests -------------------------------------------------------------

    def _handle(self, line: bytes) -> None:
        started = time.perf_counter()
        daemon = self.daemon
        if not self.allowed:
            err = Forbidden("this user or group may not use assetd")
            daemon.count_error(err.code)
            self._answer_now(error_response(peek_id(line), err))
            self.closing = True
            self._drain()
            return
        try:
            req = decode_request(line)
        except BadRequest as err:
            daemon.count_error(err.code)
            daemon.metrics.observe("invalid", err.code, time.perf_counter() - started)
            self._answer_now(error_response(peek_id(line), err))
            return
        if req.op == "ping":
            self._answer_now(ok_response(req.id, {"version": __version__}))
        elif req.op == "resolve":
            self._resolve(req, started)
        elif req.op in MAINTENANCE_OPS and not daemon.admin_allowed(
            self.peer[1], self.peer[2], self.groups
        ):
            refused = Forbidden(f"op '{req.op}' needs an admin uid or gid (daemon.admin_uids)")
            daemon.count_error(refused.code)
            self._answer_now(error_response(req.id, refused))
        else:
            self._owe(daemon.offload(req, started))

    def _resolve(self, req: Request, started: float) -> None:
        daemon = self.daemon
        try:
            hit = daemon.service.try_hit(req.source, req.version_id, req.sha256)
        except AssetError as err:
            message, took = daemon.resolve_answer(req, None, err, started)
            self._answer_now(message)
            daemon.log_resolve(req, None, err, took)  # after the answer left: keep it off the path
            return
        if hit is not None:
            self._write_now(encode_resolved(req.id, hit))
            took = time.perf_counter() - started
            daemon.metrics.observe("resolve", hit.cache, took)
            daemon.log_resolve(req, hit, None, took)
        else:
            self._owe(daemon.offload(req, started))


class Daemon:
    """Owns the socket, the event loop, the service and the signals."""

    def __init__(self, config: Config, service: AssetService, *, grace_s: float = 10.0) -> None:
        self.config = config
        self.service = service
        self.grace_s = grace_s
        self.metrics = Metrics()
        self.connections: set[_Connection] = set()
        self.loop: asyncio.AbstractEventLoop = _new_loop()
        self.requests = ThreadPoolExecutor(
            max(64, 4 * config.daemon.workers), thread_name_prefix="assetd-req"
        )
        # prefetch entries wait on downloads: on a pool of their own, never the
        # one the downloads (or the prefetch request itself) need
        self.prefetches = ThreadPoolExecutor(
            max(8, 2 * config.daemon.workers), thread_name_prefix="assetd-prefetch"
        )
        self.in_flight = 0
        self._maintenance = threading.Lock()
        self._stopping = threading.Event()
        self.watcher: Watcher | None = None
        self.background = Background()
        self.over_limit = _Throttled("connection refused: at max_connections")
        self.refused_peer = _Throttled("peer refused")
        self.slow_line = _Throttled("closed a connection: request line not finished in time")
        self.stalled = _Throttled("closed a connection: its client stopped reading answers")
        self._idle = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._socket_path: str | None = None
        self._socket_ino: int | None = None
        self._metrics_path: tuple[str | None, int | None] = (None, None)
        self.export = PrometheusExport(
            self.stats, self.metrics, listen=config.metrics.listen, textfile=config.metrics.textfile
        )

    # -- policy of the socket itself ------------------------------------------

    def peer_allowed(self, uid: int, gid: int, groups: Callable[[], frozenset[int]]) -> bool:
        """Admit by uid, primary gid or a supplementary group (read only when needed)."""
        uids, gids = self.config.daemon.allowed_uids, self.config.daemon.allowed_gids
        if not uids and not gids:
            return True  # the socket's mode and group are the gate
        if uid in uids or gid in gids:
            return True
        return bool(gids) and not groups().isdisjoint(gids)

    def refuse_over_limit(self, transport: asyncio.Transport) -> None:
        """One retryable error line, then close: the daemon is at max_connections."""
        self.count_error("unavailable")
        self.over_limit.warn(max_connections=self.config.daemon.max_connections)
        err = Unavailable("assetd is at its connection limit; try again shortly")
        if not transport.is_closing():
            transport.write(encode(error_response(None, err)))
        transport.close()

    def admin_allowed(self, uid: int, gid: int, groups: Callable[[], frozenset[int]]) -> bool:
        """May this peer run gc/verify? root and the daemon's own user always may."""
        if uid == 0 or uid == os.geteuid():
            return True
        uids, gids = self.config.daemon.admin_uids, self.config.daemon.admin_gids
        if uid in uids or gid in gids:
            return True
        return bool(gids) and not groups().isdisjoint(gids)

    def count_error(self, code: str) -> None:
        self.service.count_error(code)

    # -- answers ----------------------------------------------------------------

    def resolve_answer(
        self, req: Request, res: Resolved | None, err: AssetError | None, started: float
    ) -> tuple[dict[str, Any], float]:
        """The answer to a resolve, and how long it took; records the latency."""
        took = time.perf_counter() - started
        if res is not None:
            self.metrics.observe("resolve", res.cache, took)
            return ok_response(req.id, res.to_dict()), took
        assert err is not None
        self.metrics.observe("resolve", err.code, took)
        return error_response(req.id, err), took

    @staticmethod
    def log_resolve(
        req: Request, res: Resolved | None, err: AssetError | None, took: float
    ) -> None:
        """One event per resolve: which job got which bytes, or which error."""
        fields: dict[str, Any] = {"source": req.source, "job": req.job}
        if res is not None:
            fields.update(
                version_id=res.version_id, cache=res.cache, sha256=res.sha256, bytes=res.size
            )
            if res.resolved_source is not None:
                fields["resolved_source"] = res.resolved_source
        elif err is not None:
            fields.update(version_id=req.version_id, error=err.code, detail=err.detail)
        log.info("resolve", **fields, ms=round(took * 1000, 3))

    def offload(self, req: Request, started: float) -> asyncio.Future[bytes]:
        """Run a request that may block on the request pool; its answer as a future."""
        self.in_flight += 1
        self._idle.clear()
        future = self.loop.run_in_executor(self.requests, self._blocking, req, started)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: asyncio.Future[bytes]) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _remaining(self, req: Request, started: float) -> float:
        budget = req.timeout_s if req.timeout_s is not None else self.config.s3.deadline_s
        left = budget - (time.perf_counter() - started)
        if left <= 0:
            raise Timeout("deadline passed while the request waited for a worker")
        return left

    def _blocking(self, req: Request, started: float) -> bytes:
        try:
            if req.op == "resolve":
                return encode(self._resolve_blocking(req, started))
            if req.op == "prefetch":
                return encode(self._prefetch(req, started))
            if req.op == "stats":
                body = self.stats()
                self.metrics.observe("stats", "ok", time.perf_counter() - started)
                return encode(ok_response(req.id, body))
            if req.op in MAINTENANCE_OPS:
                body = self.maintenance(req.op)
                self.metrics.observe(req.op, "ok", time.perf_counter() - started)
                return encode(ok_response(req.id, body))
            raise BadRequest(f"unknown op '{req.op}'")
        except AssetError as err:
            return encode(error_response(req.id, err))
        except Exception as exc:  # a bug: answer and keep serving
            log.exception("request failed", op=req.op)
            return encode(
                error_response(req.id, InternalError("internal error in assetd", detail=repr(exc)))
            )

    def _resolve_blocking(self, req: Request, started: float) -> dict[str, Any]:
        res: Resolved | None = None
        err: AssetError | None = None
        try:
            left = self._remaining(req, started)
        except Timeout as exc:
            self.count_error(exc.code)  # never reached the service, which counts the rest
            err = exc
        else:
            try:
                res = self.service.resolve(
                    req.source, req.version_id, timeout_s=left, sha256=req.sha256
                )
            except AssetError as exc:
                err = exc
        message, took = self.resolve_answer(req, res, err, started)
        self.log_resolve(req, res, err, took)
        return message

    def _prefetch(self, req: Request, started: float) -> dict[str, Any]:
        # a window of PREFETCH_CONCURRENCY entries at a time: one long prefetch
        # cannot take the whole pool (or send S3 hundreds of HEADs at once)
        window: deque[Future[dict[str, Any]]] = deque()
        results = []
        for item in req.sources:
            if len(window) >= PREFETCH_CONCURRENCY:
                results.append(window.popleft().result())
            one = Request(
                "resolve",
                None,
                item.source,
                item.version_id,
                req.timeout_s,
                req.job,
                sha256=item.sha256,
            )
            window.append(self.prefetches.submit(self._resolve_blocking, one, started))
        results.extend(f.result() for f in window)
        for answer in results:
            answer.pop("id", None)
        self.metrics.observe("prefetch", "ok", time.perf_counter() - started)
        return ok_response(req.id, {"results": results})

    def maintenance(self, op: str) -> dict[str, Any]:
        """``gc`` or ``verify`` on the daemon's own store: pins and live downloads are seen."""
        store = self.service.store
        with self._maintenance:  # one at a time; a second waits rather than doubling the I/O
            if op == "verify":
                report = store.verify(stop=self._stopping)  # else SIGTERM waits for every blob
                log.info("verify", **report.to_dict())
                return report.to_dict()
            cache = self.config.cache
            recovery = store.recover()
            eviction = store.evict(max_bytes=cache.max_bytes, min_free_bytes=cache.min_free_bytes)
            pruned = store.prune_quarantine(
                max_age_s=cache.quarantine_max_age_s, max_bytes=cache.quarantine_max_bytes
            )
            body = {
                "recovery": recovery.to_dict(),
                "eviction": eviction.to_dict(),
                "quarantine_removed": pruned,
            }
            log.info("gc", **eviction.to_dict(), quarantine_removed=pruned)
            return body

    def stats(self) -> dict[str, Any]:
        store = self.service.store
        entries, size = store.totals()
        q_files, q_bytes = store.quarantine_usage()
        c, errors = self.service.snapshot()
        return {
            "entries": entries,
            "bytes": size,
            "hits": c.get("hits", 0),
            "misses": c.get("misses", 0),
            "coalesced": c.get("coalesced", 0),
            "stale": c.get("stale", 0),
            "errors": errors,
            "bytes_fetched": c.get("bytes_fetched", 0),
            "s3_requests": {
                "head": self.service.fetcher.requests["head"],
                "get": self.service.fetcher.requests["get"],
            },
            "in_flight": self.in_flight,
            "connections": len(self.connections),
            "uptime_s": round(time.time() - self.metrics.started, 3),
            "version": __version__,
            "latency": self.metrics.summary(),
            "aliases": self.service.alias_counts(),
            "last_flush_ok": self.background.state("flush").last_ok,
            "pins_refused": None if store.pin_fault is None else store.pin_fault.detail,
            "quarantine": {"files": q_files, "bytes": q_bytes},
            "background": self.background.snapshot(),
        }

    # -- lifecycle ----------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply allowlists, limits and freshness."""
        try:
            fresh = load_config(self.config.path)
        except ConfigError as exc:
            log.error("reload failed; keeping the running config", error=str(exc))
            return
        running = self.config.values()
        fixed = {
            name
            for name, value in fresh.values().items()
            if name.split(".")[0] in ("cache", "daemon", "metrics", "log")
            and name not in _RELOADABLE
            and value != running[name]
        }
        if fixed:
            log.warning("reload: these keys need a restart", keys=sorted(fixed))
        daemon = replace(
            self.config.daemon,
            allowed_uids=fresh.daemon.allowed_uids,
            allowed_gids=fresh.daemon.allowed_gids,
        )
        cache = replace(
            self.config.cache,
            **{
                k.split(".")[1]: getattr(fresh.cache, k.split(".")[1])
                for k in _RELOADABLE
                if k.startswith("cache.")
            },
        )
        self.config = replace(fresh, daemon=daemon, cache=cache)
        self.service.reconfigure(replace(self.service.config, s3=fresh.s3, cache=cache))
        self.reload_catalog()
        log.info(
            "reloaded",
            allowed_buckets=list(fresh.s3.allowed_buckets),
            allowed_prefixes=list(fresh.s3.allowed_prefixes),
            max_object_bytes=fresh.s3.max_object_bytes,
        )

    def reload_catalog(self) -> None:
        """Re-read the asset catalog; an invalid one is refused and the running one kept."""
        path = catalog_path(self.config.catalog.file, self.config.path)
        try:
            catalog = load_catalog(path) if path else None
        except ConfigError as exc:
            log.error("catalog reload failed; keeping the running catalog", error=str(exc))
            return
        self.service.set_catalog(catalog)
        if path and self.watcher is not None:
            self.watcher.watch_file(path, self._reload_soon)
        log.info("catalog loaded", file=path, entries=len(catalog.entries) if catalog else 0)

    def _listen(self) -> socket.socket:
        activated = systemd.listen_fds()
        if activated:
            sock = activated[0]
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ConfigError(
                    "socket activation passed a socket that is not a Unix stream socket; "
                    "assetd.socket needs ListenStream=/run/assetd/assetd.sock"
                )
            return sock  # systemd owns the path: never unlink it
        sock = bind_socket(
            self.config.daemon.socket,
            self.config.daemon.socket_mode,
            self.config.daemon.socket_group,
        )
        self._socket_path = self.config.daemon.socket
        self._socket_ino = os.stat(self._socket_path).st_ino
        return sock

    def _unlink_socket(self) -> None:
        for path, ino in ((self._socket_path, self._socket_ino), self._metrics_path):
            if path is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == ino:
                    os.unlink(path)

    def _metrics_socket(self) -> socket.socket | None:
        """The Unix socket for /metrics, with the main socket's mode and group."""
        path = self.config.metrics.socket
        if not path:
            return None
        daemon = self.config.daemon
        sock = bind_socket(path, daemon.socket_mode, daemon.socket_group)
        self._metrics_path = (path, os.stat(path).st_ino)
        return sock

    def admit(self, sock: socket.socket) -> bool:
        """The main socket's peer check, for another Unix socket (metrics)."""
        try:
            _pid, uid, gid = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            return False
        return self.peer_allowed(uid, gid, lambda: peer_groups(sock))

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        asyncio.set_event_loop(self.loop)
        try:
            return self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()

    def _raise_fd_limit(self) -> None:
        """Room for max_connections sockets plus the cache's own files."""
        want = self.config.daemon.max_connections + 256
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            if target < want:
                log.warning("open-file limit below max_connections", limit=hard, wanted=want)

    async def _main(self) -> int:
        self._stop = asyncio.Event()
        self._raise_fd_limit()
        sock = self._listen()
        # metrics first: once the socket answers, everything it promises is up
        await self.export.serve(self._metrics_socket(), self.admit)
        server = await self.loop.create_unix_server(lambda: _Connection(self), sock=sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        self.export.start()
        try:
            self.watcher = self._start_watcher()
        except Exception as exc:  # e.g. out of inotify watches: serve anyway, retry later
            self.background.failed("watcher", exc)
        else:
            self.background.ok("watcher")
        tasks = [asyncio.ensure_future(self._flush_loop())]
        tasks.append(asyncio.ensure_future(self._expire_loop()))
        interval = systemd.watchdog_interval()
        if interval:
            tasks.append(asyncio.ensure_future(self._watchdog(interval)))
        if not self.config.s3.allowed_buckets:
            log.warning("no allowed_buckets: any bucket the credentials reach can be fetched")
        log.info(
            "ready",
            socket=self._socket_path or "systemd socket activation",
            cache=str(self.service.store.root),
            version=__version__,
        )
        systemd.notify("READY=1\nSTATUS=serving")
        # the expensive part of crash recovery runs after READY, beside serving
        recovery = self.loop.run_in_executor(None, self._recover)
        await self._stop.wait()

        systemd.notify("STOPPING=1")
        log.info("stopping", in_flight=self.in_flight, grace_s=self.grace_s)
        server.close()
        self.export.close_servers()
        self._unlink_socket()
        if self.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.grace_s)
        self.service.fetcher.abort()  # what is left ends with a clean error, no partial blob
        if self.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 5.0)
        for conn in list(self.connections):
            conn.closing = True
            conn._drain()
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        self._stopping.set()
        if self.watcher is not None:
            self.watcher.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(recovery, 30)
        code = await self.loop.run_in_executor(None, self._close)
        log.info("stopped")
        flush_logs()
        return code

    def _start_watcher(self) -> Watcher:
        watcher = Watcher(self.service.store, self.config.path, self._reload_soon)
        watcher.start()
        path = catalog_path(self.config.catalog.file, self.config.path)
        if path:
            watcher.watch_file(path, self._reload_soon)  # saving the catalog reloads it too
        return watcher

    def _close(self) -> int:
        """Release everything; a failing disk gives one clear line and status 1, no traceback."""
        self.export.stop()
        self.requests.shutdown(wait=True, cancel_futures=True)
        self.prefetches.shutdown(wait=True, cancel_futures=True)
        self.service.close()
        try:
            self.service.store.close()
        except Exception as exc:
            # committed rows are already durable (each commit is its own transaction);
            # only access times and pins of the last second are lost
            log.error("could not write pins to the index at exit", error=str(exc))
            return 1
        return 0

    def _reload_soon(self) -> None:
        """From the watchdog's thread: reload on the loop, as SIGHUP does."""
        self.loop.call_soon_threadsafe(self.reload)

    def _recover(self) -> None:
        """Start-up recovery, retried with backoff until it succeeds or the daemon stops."""
        while True:
            try:
                report = self.service.store.recover()
            except Exception as exc:
                delay = self.background.failed("recovery", exc)
                if self._stopping.wait(delay):
                    return
                continue
            self.background.ok("recovery")
            log.info("cache recovered", **report.to_dict())
            return

    def _housekeeping(self) -> None:
        """Keep the cache within its limits even when other tenants fill the disk."""
        store, cache = self.service.store, self.config.cache
        if store.recovered.is_set():
            store.evict(max_bytes=cache.max_bytes, min_free_bytes=cache.min_free_bytes)
        store.sweep_tmp()
        store.prune_quarantine(
            max_age_s=cache.quarantine_max_age_s, max_bytes=cache.quarantine_max_bytes
        )

    async def _flush_loop(self) -> None:
        """Pins to the index every second; eviction and the watcher's health every 30."""
        delay = FLUSH_EVERY_S
        every = FLUSH_EVERY_S * EVICT_EVERY_TICKS  # on the clock: failing flushes back off
        next_housekeeping = self.loop.time() + every
        while True:
            await asyncio.sleep(delay)
            try:
                await self.loop.run_in_executor(None, self.service.store.flush)
            except Exception as exc:  # the store now refuses new pins until a flush succeeds
                # retried at least every 5 s: resolves are refused until it works
                delay = min(5.0, self.background.failed("flush", exc))
            else:
                self.background.ok("flush")
                delay = FLUSH_EVERY_S
            if self.loop.time() >= next_housekeeping:
                next_housekeeping = self.loop.time() + every
                await self._background_step("housekeeping", self._housekeeping)
                await self._background_step("watcher", self._check_watcher)

    async def _background_step(self, task: str, step: Callable[[], None]) -> None:
        try:
            await self.loop.run_in_executor(None, step)
        except Exception as exc:  # retried at the next tick; never ends the loop
            self.background.failed(task, exc)
        else:
            self.background.ok(task)

    def _check_watcher(self) -> None:
        """Restart the watcher if its thread died or never started."""
        if self.watcher is None or not self.watcher.alive():
            if self.watcher is not None:
                self.watcher.stop()
            self.watcher = None
            self.watcher = self._start_watcher()

    async def _expire_loop(self) -> None:
        """Close idle, half-sent and non-reading connections (see _Connection.expire)."""
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            now = self.loop.time()
            for conn in list(self.connections):
                conn.expire(now)

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


_RELOADABLE = frozenset(
    {
        "daemon.allowed_uids",
        "daemon.allowed_gids",
        "cache.pin_seconds",
        "cache.revalidate_after_s",
        "cache.serve_stale_on_error",
        "cache.negative_ttl_s",
        "cache.max_bytes",
        "cache.min_free_bytes",
        "cache.quarantine_max_age_s",  # read by each housekeeping pass and gc
        "cache.quarantine_max_bytes",
    }
)


def build_daemon(config: Config, *, grace_s: float = 10.0) -> Daemon:
    """Wire the real parts: store, S3 fetcher, service, daemon."""
    from assetd.fetcher.s3 import S3Fetcher
    from assetd.store import Store

    path = catalog_path(config.catalog.file, config.path)
    catalog = load_catalog(path) if path else None  # invalid: start fails, naming the entry
    store = Store(config.cache.dir, lock=True)  # raises CacheLocked if another owns it
    fetcher = S3Fetcher(config.s3, max_connections=max(16, config.daemon.workers * 2))
    service = AssetService(config, fetcher, store)
    service.set_catalog(catalog)
    return Daemon(config, service, grace_s=grace_s)
