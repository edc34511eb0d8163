"""Placing resolved assets into a Docker container that already runs.

A running container cannot get a new bind mount, and Docker's archive API
(``put_archive``, ``docker cp``) writes below a tmpfs mounted over the
target's directory: it answers 200 and the file stays invisible inside. So
``inject`` streams ``assetd.grader.tar_stream`` into the stdin of ONE
``docker exec`` that runs ``tar -x`` (or ``dd`` per file in images without
tar) as root in the container's own mount namespace, where a tmpfs ``/tmp``
is what the student sees. Nothing passes through argv, so there is no size
limit, and the grader holds about one chunk in memory whatever the sizes.

Each asset is written to a hidden temporary name next to its target, its
size checked, its mode set, then renamed over the target once every asset
arrived: a failure leaves no asset half written. Failures are
``Unavailable`` (retryable): they are the sandbox's or the engine's fault,
never the student's.

The docker SDK (``pip install assetd[docker]``) is imported lazily, so
``assetd.grader`` works without it.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import secrets
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from assetd.errors import AssetError, BadRequest, Unavailable
from assetd.grader import ResolvedAsset, _check_target, tar_stream

__all__ = ["InjectResult", "inject"]

# a library inside the grader's process: stdlib logging, the host app decides where it goes
log = logging.getLogger("assetd.grader_docker")

# exit codes of the placement script (sh uses 126/127 for "cannot run")
_NO_TAR = 69  # EX_UNAVAILABLE: the image has no tar; nothing was read or written
_EXIT_REASONS = {
    65: "the archive could not be extracted",
    66: "an asset arrived short",
    67: "an asset could not be moved into place",
    68: "a target is an existing directory",
    70: "an asset's mode or owner could not be set",
    71: "an asset could not be written",
}
_MAX_OUTPUT = 64 << 10  # what we keep of the script's output, for the log
_DEFAULT_TIMEOUT_S = 600.0
_POLL_S = 0.5  # how long a blocked write waits before asking whether the exec still runs


@dataclass(frozen=True, slots=True)
class InjectResult:
    """What one ``inject`` did: the method used, bytes sent and exec calls made."""

    method: str
    bytes_sent: int
    exec_calls: int
    seconds: float


def inject(
    container: Any,
    assets: Sequence[ResolvedAsset],
    *,
    method: str = "auto",
    chunk_size: int = 1 << 20,
    timeout_s: float | None = 600.0,
    writable_owner: str | None = None,
) -> InjectResult:
    """Place every asset at its target in a running container, in one exec call.

    ``container`` is a docker SDK ``Container``. ``method`` is ``"tar"``
    (the archive goes to ``tar -x``), ``"dd"`` (bodies go to ``dd``, for
    images without tar) or ``"auto"``: tar, and dd in a second call only if
    the image has no tar (nothing is placed by the first). Read-only assets
    end as root-owned mode 0444, writable ones mode 0644, owned by
    ``writable_owner`` (``"uid:gid"``) if given (which needs CAP_CHOWN in the
    container). Parent directories are created (root, 0755).

    Raises ``BadRequest`` for an invalid or duplicate target and
    ``Unavailable`` when the engine or the container failed; then no asset
    was placed half (an asset is either complete at its target or absent).
    """
    if method not in ("auto", "tar", "dd"):
        raise ValueError(f"unknown inject method {method!r}")
    if writable_owner is not None and not _valid_owner(writable_owner):
        raise BadRequest("writable_owner must be 'uid:gid' with numeric ids")
    _check_targets(assets)
    started = time.monotonic()
    if not assets:
        return InjectResult(method, 0, 0, 0.0)
    token = secrets.token_hex(6)
    staged = [_staged(a, token, i) for i, a in enumerate(assets)]
    job = _Job(assets, staged, chunk_size, timeout_s, writable_owner)
    used = "dd" if method == "dd" else "tar"
    code, sent, output = _run(container, used, job)
    calls = 1
    if code == _NO_TAR and method == "auto":
        log.info("no tar in container %s: placing with dd", _short_id(container))
        used = "dd"
        code, sent, output = _run(container, used, job)
        calls = 2
    if code != 0:
        reason = _EXIT_REASONS.get(code, f"the placement command exited {code}")
        if code == _NO_TAR:
            reason = "the container has no tar (use method='dd')"
        log.warning(
            "inject failed: container %s, method %s, exit code %s, output %r",
            _short_id(container),
            used,
            code,
            output.decode("utf-8", "replace")[-2000:],
        )
        raise Unavailable(f"could not place assets in the sandbox: {reason}")
    seconds = time.monotonic() - started
    log.info(
        "injected %d assets (%d bytes) into container %s by %s in %.3f s",
        len(assets),
        sent,
        _short_id(container),
        used,
        seconds,
    )
    return InjectResult(used, sent, calls, seconds)


@dataclass(frozen=True, slots=True)
class _Job:
    assets: Sequence[ResolvedAsset]
    staged: Sequence[str]
    chunk_size: int
    timeout_s: float | None
    writable_owner: str | None


def _check_targets(assets: Sequence[ResolvedAsset]) -> None:
    seen: set[str] = set()
    for asset in assets:
        _check_target(asset.spec.target)
        if asset.spec.target in seen:
            raise BadRequest(f"two assets have the same target '{asset.spec.target}'")
        seen.add(asset.spec.target)


def _valid_owner(owner: str) -> bool:
    parts = owner.split(":")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


def _staged(asset: ResolvedAsset, token: str, index: int) -> str:
    """The hidden name next to the target that the bytes land at first."""
    parent = posixpath.dirname(asset.spec.target)
    return posixpath.join(parent, f".assetd-{token}-{index}")


def _script(
    method: str,
    assets: Sequence[ResolvedAsset],
    staged: Sequence[str],
    writable_owner: str | None,
) -> str:
    """The sh script the exec runs; it reads the stream from stdin."""
    q = shlex.quote
    temps = " ".join(q(s) for s in staged)
    lines = [
        "umask 022",
        f"cleanup() {{ rm -f -- {temps}; }}",
        "fail() { cleanup; exit $1; }",
        # a pre-existing directory at a target would swallow the file (mv into it)
        *(f"[ -d {q(a.spec.target)} ] && fail 68" for a in assets),
    ]
    if method == "tar":
        lines += [
            # a tar file on PATH (a shell may run a built-in applet for `command -v`)
            'has_tar() { IFS=:; for d in $PATH; do [ -x "$d/tar" ] && return 0; done; return 1; }',
            f"has_tar || exit {_NO_TAR}",
            "unset IFS",
            "tar -x -o -f - -C / || fail 65",
        ]
    else:
        for asset, tmp in zip(assets, staged, strict=True):
            parent = posixpath.dirname(asset.spec.target)
            lines.append(f"mkdir -p -- {q(parent)} || fail 71")
            # dd reads with read(2), never past the count: the next body stays on stdin
            lines.append(
                f"dd of={q(tmp)} bs=65536 count={asset.size} iflag=count_bytes,fullblock"
                " 2>/dev/null || fail 71"
            )
    for asset, tmp in zip(assets, staged, strict=True):
        size = "$(stat -c %s -- " + q(tmp) + " 2>/dev/null || wc -c < " + q(tmp) + ")"
        lines.append(f'[ "{size}" = {asset.size} ] || fail 66')
        mode = "0444" if asset.spec.read_only else "0644"
        lines.append(f"chmod {mode} {q(tmp)} || fail 70")
        if writable_owner is not None and not asset.spec.read_only:
            lines.append(f"chown {q(writable_owner)} {q(tmp)} || fail 70")
    # only now, with every asset complete, do the targets change (rename in one directory)
    lines += [
        f"mv -f -- {q(tmp)} {q(a.spec.target)} || fail 67"
        for a, tmp in zip(assets, staged, strict=True)
    ]
    return "\n".join(lines) + "\n"


def _body(
    method: str, assets: Sequence[ResolvedAsset], staged: Sequence[str], chunk_size: int
) -> Iterator[bytes]:
    if method == "tar":
        # the archive names the hidden staging paths; tar_stream keeps the specs' modes
        renamed = [
            replace(a, spec=replace(a.spec, target=s)) for a, s in zip(assets, staged, strict=True)
        ]
        yield from tar_stream(renamed, chunk_size=chunk_size)
        return
    for asset in assets:
        left = asset.size
        with open(asset.path, "rb") as src:
            while left:
                chunk = src.read(min(chunk_size, left))
                if not chunk:
                    raise Unavailable(f"asset for '{asset.spec.target}' shrank while being sent")
                yield chunk
                left -= len(chunk)


def _run(container: Any, method: str, job: _Job) -> tuple[int, int, bytes]:
    """One exec: the script reads the body on stdin. Returns (exit code, bytes sent, output)."""
    from docker.errors import DockerException

    api = container.client.api
    timeout_s = job.timeout_s
    script = _script(method, job.assets, job.staged, job.writable_owner)
    try:
        exec_id = api.exec_create(
            container.id,
            ["/bin/sh", "-c", script],
            stdin=True,
            stdout=True,
            stderr=True,
            user="0:0",
            workdir="/",
        )["Id"]
        raw = api.exec_start(exec_id, socket=True)
    # the SDK lets the engine's connection errors out as requests' (OSError) ones, unwrapped
    except (DockerException, OSError) as exc:
        raise Unavailable(
            "could not place assets in the sandbox: the Docker engine refused the exec",
            detail=str(exc),
        ) from exc
    sock: socket.socket = getattr(raw, "_sock", raw)
    sock.settimeout(timeout_s)
    output = bytearray()
    reader = threading.Thread(target=_drain, args=(sock, output), daemon=True)
    reader.start()
    sent = 0
    cut: AssetError | None = None
    try:
        try:
            for chunk in _body(method, job.assets, job.staged, job.chunk_size):
                _send(sock, chunk, lambda: bool(api.exec_inspect(exec_id)["Running"]), timeout_s)
                sent += len(chunk)
        except (OSError, _Exited) as exc:
            # the script stopped reading (it failed, or there is no tar): its exit code says why
            log.info("exec stdin closed early after %d bytes: %r", sent, exc)
        except AssetError as exc:
            cut = exc  # a blob changed under us: end the stream short, the script cleans up
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        # the stream ends when the script exits: waiting on it beats polling the engine
        deadline = time.monotonic() + (timeout_s or _DEFAULT_TIMEOUT_S)
        while reader.is_alive() and time.monotonic() < deadline:
            reader.join(_POLL_S)
            if reader.is_alive() and not api.exec_inspect(exec_id)["Running"]:
                break
        code = _exit_code(api, exec_id, timeout_s)
    except (DockerException, OSError) as exc:
        raise Unavailable(
            "could not place assets in the sandbox: the Docker engine did not answer",
            detail=str(exc),
        ) from exc
    finally:
        reader.join(1.0)  # normally over already: the engine ends the stream at exit
        if reader.is_alive():  # a hung exec: unblock the reader rather than wait for it
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            reader.join(1.0)
        _close(sock, raw)
    if cut is not None:
        # waited for the exit above, so the container holds no staging file when we raise
        raise Unavailable(f"could not place assets in the sandbox: {cut.message}") from cut
    return code, sent, bytes(output)


class _Exited(Exception):
    """The exec ended while we were still writing its stdin."""


def _send(
    sock: socket.socket, data: bytes, running: Callable[[], bool], timeout_s: float | None
) -> None:
    """Write all of ``data``; stop if the exec exits, since Docker then stops reading it."""
    view = memoryview(data)
    idle_since = time.monotonic()
    while view:
        _, writable, _ = select.select([], [sock], [], _POLL_S)
        if not writable:
            # a full socket: either tar is slow, or it exited and nobody reads any more
            if not running():
                raise _Exited
            if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                raise Unavailable("could not place assets in the sandbox: the exec stopped reading")
            continue
        sent = sock.send(view)
        view = view[sent:]
        idle_since = time.monotonic()


def _drain(sock: socket.socket, output: bytearray) -> None:
    """Read the exec's multiplexed stdout/stderr until it ends; keep the last bytes."""
    from docker.utils.socket import frames_iter

    with contextlib.suppress(OSError, StopIteration):
        for _stream, data in frames_iter(sock, tty=False):
            output += data
            if len(output) > _MAX_OUTPUT:
                del output[: len(output) - _MAX_OUTPUT]


def _close(sock: socket.socket, raw: Any) -> None:
    with contextlib.suppress(OSError):
        sock.close()
    with contextlib.suppress(Exception):
        raw.close()


def _exit_code(api: Any, exec_id: str, timeout_s: float | None) -> int:
    """The exec's exit code; the stream can end a moment before Docker records it."""
    deadline = time.monotonic() + (timeout_s or _DEFAULT_TIMEOUT_S)
    while True:
        info = api.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return int(info["ExitCode"])
        if time.monotonic() > deadline:
            raise Unavailable("could not place assets in the sandbox: the exec did not finish")
        time.sleep(0.005)


def _short_id(container: Any) -> str:
    return str(getattr(container, "id", "?"))[:12]
