"""A real dockerd for tests and benchmarks, per shared/docker.md.

Runs as root with its own short temp directory (socket paths have a 108-byte
limit), the vfs storage driver, no bridge and no iptables. No registry is
reachable, so the images are imported from local files: ``IMAGE`` has the
static busybox and every applet, ``IMAGE_NO_TAR`` all but tar, and
``IMAGE_GNU`` the host's dash, GNU tar and coreutils (as in Debian-based
images; busybox's shell would run its own applets even where GNU tools are).
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE = "assetd-test:busybox"
IMAGE_NO_TAR = "assetd-test:notar"
IMAGE_GNU = "assetd-test:gnu"  # dash, GNU tar and coreutils from the host (Debian images' tools)
_GNU_TOOLS = (
    "dash", "tar", "stat", "mv", "chmod", "chown", "mkdir", "rm", "dd", "cat", "sha256sum",
    "wc", "sleep", "find", "sort", "ls",
)  # fmt: skip


def missing() -> str | None:
    """Why a real Docker cannot run here, or None when it can."""
    for command in ("dockerd", "busybox"):
        if shutil.which(command) is None:
            return f"{command} not installed (make test installs docker.io and busybox-static)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed (pip install assetd[docker])"
    return None


def _rootfs_tar(busybox: Path, without: frozenset[str] = frozenset()) -> bytes:
    """A tar of / with the static busybox and one symlink per applet, in memory (~2 MB)."""
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777), ("data", 0o755), ("etc", 0o755)):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in sorted(set(applets) - without - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        passwd = b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        tar.addfile(info, io.BytesIO(passwd))
    return out.getvalue()


def _gnu_rootfs_tar() -> bytes | None:
    """A merged-/usr rootfs of the host's dash, GNU tar and coreutils with their libraries."""
    found = [shutil.which(tool) for tool in _GNU_TOOLS]
    if None in found:
        return None
    files: set[str] = set()
    for binary in found:
        assert binary is not None
        files.add(binary)
        ldd = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
        files.update(re.findall(r"(/\S+\.so[.\d]*)", ldd))

    def under_usr(path: str) -> str:
        for top in ("/bin/", "/sbin/", "/lib/", "/lib64/"):
            if path.startswith(top):
                return "usr" + path
        return path.lstrip("/")

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("tmp", "data", "usr", "usr/bin", "usr/lib", "usr/lib64"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        for name, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            tar.addfile(link)
        names = {under_usr(path): path for path in sorted(files)}
        parents = sorted(
            {posixpath.dirname(n) for n in names} - {"usr", "usr/bin", "usr/lib", "usr/lib64"}
        )
        for parent in parents:
            info = tarfile.TarInfo(parent)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, path in sorted(names.items()):
            tar.add(os.path.realpath(path), arcname=name)
        if "usr/bin/sh" not in names:
            link = tarfile.TarInfo("usr/bin/sh")
            link.type, link.linkname = tarfile.SYMTYPE, "dash"
            tar.addfile(link)
    return out.getvalue()


@dataclass
class Dockerd:
    """One dockerd process; use as a context manager."""

    root: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _clients: list[Any] = field(default_factory=list)

    @property
    def host(self) -> str:
        assert self.root is not None
        return f"unix://{self.root}/docker.sock"

    def client(self) -> Any:
        """A docker SDK client; the API version is negotiated (dockerd 20.10 speaks 1.41)."""
        import docker

        client = docker.DockerClient(base_url=self.host, version="auto", timeout=300)
        self._clients.append(client)
        return client

    def start(self, timeout: float = 60.0) -> Dockerd:
        self.root = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))
        argv = [
            "dockerd",
            f"--host={self.host}",
            f"--data-root={self.root}/root",
            f"--exec-root={self.root}/exec",
            f"--pidfile={self.root}/docker.pid",
            "--iptables=false",
            "--ip-forward=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ]
        with (self.root / "log").open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready(timeout)
            busybox = Path(os.path.realpath(shutil.which("busybox") or "busybox"))
            api = self.client().api
            for image, without in ((IMAGE, frozenset()), (IMAGE_NO_TAR, frozenset({"tar"}))):
                repo, tag = image.split(":")
                api.import_image_from_data(_rootfs_tar(busybox, without), repository=repo, tag=tag)
            gnu = _gnu_rootfs_tar()
            if gnu is not None:
                repo, tag = IMAGE_GNU.split(":")
                api.import_image_from_data(gnu, repository=repo, tag=tag)
        except Exception as exc:  # leave nothing running or on disk behind
            log = self.log()[-2000:]
            self.stop()
            raise RuntimeError(f"{exc}; dockerd log: {log}") from exc
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}")
            try:
                self.client().ping()
                return
            except Exception:  # not up yet: poll again
                time.sleep(0.2)
        raise RuntimeError(f"dockerd not ready after {timeout}s")

    def log(self) -> str:
        if self.root is None or not (self.root / "log").exists():
            return ""
        return (self.root / "log").read_text(errors="replace")

    def stop(self) -> None:
        """Remove every container, SIGTERM dockerd, wait, remove its directory."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                for c in client.containers.list(all=True):
                    c.remove(force=True)
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
        if self.root is not None:
            _unmount_under(self.root)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> Dockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything dockerd left mounted below ``root`` (netns files, shm)."""
    prefix = str(root) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
    for point in sorted(points, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
