"""From the docs to a running service: docs/operations.md's install steps, as far
as a machine without systemd as PID 1 allows.

The test takes its commands and files from the runbook itself (the fenced
blocks marked ``<!-- test:NAME -->``) and from the shipped unit, so a step
that stops working in the docs fails here:

- build a wheel from a copy of the checkout and install it into a fresh venv
  made with the system Python (``test:wheel``, ``test:venv``);
- create the daemon's user, the graders' group and a grader account
  (``test:install``), under unique names, removed afterwards;
- write the config (``test:config`` plus the SeaweedFS block) and the
  credentials file in the format of ``test:credentials``;
- create the runtime and cache directories (``test:dirs``) and start
  ExecStart= as the unit would: its User=, Group=, UMask=, Environment= and
  EnvironmentFile=, with the paths moved into a temporary directory;
- resolve an asset as the grader, be refused as a non-member, and find the
  owners and modes of the runbook's table (``test:modes``).
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import write_config
from tests.support.seaweedfs import READER_KEY, SeaweedFS, ensure_bucket

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "operations.md"
UNIT = ROOT / "systemd" / "assetd.service"
SYSTEM_PYTHON = "/usr/bin/python3"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
BUCKET = "autograder-assets"
KEY = "datasets/install/probe.csv"
BODY = b"id,name\n1,probe\n"


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def doc_block(name: str) -> str:
    """The fenced block that follows ``<!-- test:NAME -->`` in the runbook."""
    found = re.search(
        rf"<!-- test:{name} -->\n```[a-z]*\n(.*?)\n```", RUNBOOK.read_text(encoding="utf-8"), re.S
    )
    assert found is not None, f"operations.md has no <!-- test:{name} --> block"
    return found.group(1)


def doc_commands(name: str, *programs: str) -> list[list[str]]:
    """The block's command lines that start with one of ``programs``, split like a shell."""
    return [shlex.split(line) for line in doc_block(name).splitlines() if line.startswith(programs)]


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


@dataclass
class Host:
    """One simulated grading host under a temporary directory; names unique per run."""

    base: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    made_users: list[str] = field(default_factory=list)
    made_groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.user, self.group = f"adu{self.tag}", f"adg{self.tag}"
        self.grader, self.outsider = f"adr{self.tag}", f"ado{self.tag}"
        self.venv = self.base / "opt-assetd"
        self.etc = self.base / "etc-assetd"
        self.run_dir = self.base / "run"
        self.cache = self.base / "cache"

    def path(self, word: str) -> str:
        """A path or name of the runbook, moved onto this host."""
        moves = {
            "assetd-graders": self.group,
            "assetd": self.user,
            "grader": self.grader,
            "python3": SYSTEM_PYTHON,
        }
        if word in moves:
            return moves[word]
        for prefix, here in (
            ("/opt/assetd", self.venv),
            ("/etc/assetd", self.etc),
            ("/run/assetd", self.run_dir),
            ("/var/cache/assetd", self.cache),
        ):
            if word == prefix or word.startswith(prefix + "/"):
                return str(here) + word[len(prefix) :]
        return word

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=180, check=False, **kwargs
        )
        assert 0 == result.returncode, f"{argv}: {result.stdout}{result.stderr}"
        return result

    def as_user(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as ``user`` with that account's groups (runuser: initgroups)."""
        return subprocess.run(
            [RUNUSER, "-u", user, "--", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )

    def cleanup(self) -> None:
        for user in self.made_users:
            subprocess.run(["userdel", user], capture_output=True, check=False)
        for group in self.made_groups:
            subprocess.run(["groupdel", group], capture_output=True, check=False)


def _unused(name: str, database: str) -> None:
    taken = subprocess.run(["getent", database, name], capture_output=True, check=False)
    assert 0 != taken.returncode, f"{name} already exists"


@pytest.fixture
def host() -> Iterator[Host]:
    _need(os.geteuid() == 0, "creates users and switches to them: needs root")
    for tool in ("useradd", "groupadd", "usermod", "userdel", "groupdel", "runuser"):
        _need(shutil.which(tool) is not None, f"{tool} is not installed")
    _need(os.path.exists(SYSTEM_PYTHON), f"{SYSTEM_PYTHON} is missing")
    venv_ok = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import ensurepip, venv"], capture_output=True, check=False
    )
    _need(0 == venv_ok.returncode, "the system Python has no venv (apt-get install python3-venv)")
    # world-traversable: the daemon's user and the graders must reach the venv and the socket
    base = Path(tempfile.mkdtemp(prefix="adi", dir="/tmp"))
    base.chmod(0o755)
    h = Host(base)
    try:
        yield h
    finally:
        h.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _install_package(h: Host) -> None:
    """test:venv and test:wheel: a wheel built from a copy of the checkout, installed."""
    (venv_cmd,) = doc_commands("venv", "python3 -m venv")
    h.run([h.path(w) for w in venv_cmd], umask=0o022)
    src = h.base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "assetd", src / "assetd", ignore=shutil.ignore_patterns("__pycache__"))
    (wheel_cmd,) = doc_commands("wheel", "python3 -m pip wheel")
    # "on a build machine": the fresh venv's Python has pip, whatever the system's lacks
    h.run([str(h.venv / "bin" / "python"), *wheel_cmd[1:]], cwd=src, umask=0o022)
    (wheel,) = (src / "dist").glob("assetd-*.whl")
    (pip_cmd,) = doc_commands("venv", "/opt/assetd/bin/pip install")
    assert pip_cmd[-1].startswith("./assetd-") and pip_cmd[-1].endswith(".whl")
    h.run([h.path(w) for w in pip_cmd[:-1]] + [str(wheel)], umask=0o022)


def _create_accounts(h: Host) -> None:
    """test:install: the graders' group, the daemon's user, a grader in the group."""
    _unused(h.group, "group")
    for name in (h.user, h.grader, h.outsider):
        _unused(name, "passwd")
    for argv in doc_commands("install", "groupadd", "useradd"):
        h.run([h.path(w) for w in argv])
        (h.made_groups if argv[0] == "groupadd" else h.made_users).append(h.path(argv[-1]))
    for name in (h.grader, h.outsider):  # ordinary accounts of the host, not from the runbook
        h.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name])
        h.made_users.append(name)
    (usermod,) = doc_commands("install", "usermod")
    h.run([h.path(w) for w in usermod])


def _configure(h: Host, seaweedfs: SeaweedFS) -> Path:
    """test:config plus the SeaweedFS block, and the credentials file; as root, 0644 and 0600."""
    h.etc.mkdir(mode=0o755)
    sections: dict[str, dict[str, Any]] = tomllib.loads(doc_block("config"))
    weed = tomllib.loads(doc_block("seaweedfs"))["s3"]
    sections["s3"] |= weed | {"endpoint_url": seaweedfs.endpoint_url}
    config = write_config(h.etc / "config.toml", sections)
    config.chmod(0o644)
    assigned = dict(
        line.split("=", 1) for line in doc_block("credentials").splitlines() if "=" in line[:30]
    )
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} == set(assigned)
    (env_file,) = [h.path(v.lstrip("-")) for v in unit_settings()["EnvironmentFile"]]
    fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"AWS_ACCESS_KEY_ID={READER_KEY[0]}\nAWS_SECRET_ACCESS_KEY={READER_KEY[1]}\n")
    return config


def _start_like_systemd(h: Host, config: Path) -> subprocess.Popen[bytes]:
    """ExecStart= with the unit's User=, Group=, UMask=, Environment= and EnvironmentFile=."""
    for argv in doc_commands("dirs", "install -d"):
        h.run([h.path(w) for w in argv])
    unit = unit_settings()
    (exec_start,) = unit["ExecStart"]
    argv = [h.path(w) for w in shlex.split(exec_start)]
    assert str(config) in argv
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    for assignment in unit["Environment"]:
        name, _, value = assignment.partition("=")
        env[name] = h.path(value)
    for env_file in unit["EnvironmentFile"]:
        for line in Path(h.path(env_file.lstrip("-"))).read_text().splitlines():
            name, _, value = line.partition("=")
            env[name] = value
    # CacheDirectory= is /var/cache/assetd, the default cache.dir: moved here by env
    env |= {
        "ASSETD_CACHE_DIR": str(h.cache),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    log = (h.base / "daemon.log").open("wb")
    with log:
        proc = subprocess.Popen(
            argv,
            env=env,
            user=h.path(unit["User"][0]),
            group=h.path(unit["Group"][0]),
            extra_groups=[],
            umask=int(unit["UMask"][0], 8),
            stdout=log,
            stderr=log,
        )
    sock = env["ASSETD_SOCKET"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert None is proc.poll(), (h.base / "daemon.log").read_text()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(b'{"op":"ping"}\n')
            if json.loads(s.makefile().readline())["ok"]:
                return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"daemon not ready: {(h.base / 'daemon.log').read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _owner_and_mode(path: str) -> tuple[str, str]:
    import grp
    import pwd

    st = os.stat(path)
    owner = f"{pwd.getpwuid(st.st_uid).pw_name}:{grp.getgrgid(st.st_gid).gr_name}"
    return owner, f"{stat.S_IMODE(st.st_mode):04o}"


def test_install_from_the_runbook(host: Host, seaweedfs: SeaweedFS) -> None:
    """Installed as the runbook says, the daemon serves a grader and refuses anyone else."""
    h = host
    ensure_bucket(seaweedfs.client(), BUCKET)
    seaweedfs.client().put_object(Bucket=BUCKET, Key=KEY, Body=BODY)

    _install_package(h)
    _create_accounts(h)
    config = _configure(h, seaweedfs)
    shown = h.run([str(h.venv / "bin" / "assetd"), "config", "--config", str(config)]).stdout
    assert re.search(rf"^s3\.endpoint_url += \S+ +# file:{re.escape(str(config))}$", shown, re.M)

    daemon = _start_like_systemd(h, config)
    try:
        sock = str(h.run_dir / "assetd.sock")
        source = f"s3://{BUCKET}/{KEY}"
        assetd = str(h.venv / "bin" / "assetd")

        got = h.as_user(h.grader, assetd, "get", "--json", "--socket", sock, source)
        assert 0 == got.returncode, got.stderr + (h.base / "daemon.log").read_text()
        answer = json.loads(got.stdout)
        assert (True, "miss", str(h.cache)) == (
            answer["ok"],
            answer["cache"],
            answer["path"][: len(str(h.cache))],
        )
        read = h.as_user(h.grader, "cat", answer["path"])
        assert (0, BODY.decode()) == (read.returncode, read.stdout)

        refused = h.as_user(h.outsider, assetd, "get", "--socket", sock, source)
        assert 3 == refused.returncode
        assert "Permission denied" in refused.stderr
        peeked = h.as_user(h.outsider, "cat", answer["path"])
        assert (1, "") == (peeked.returncode, peeked.stdout)

        blob = answer["path"]
        where = {
            "/run/assetd": str(h.run_dir),
            "/run/assetd/assetd.sock": sock,
            "/var/cache/assetd": str(h.cache),
            "/var/cache/assetd/blobs/sha256/<2 hex>": os.path.dirname(blob),
            "/var/cache/assetd/blobs/sha256/<2 hex>/<64 hex>": blob,
        }
        table = {
            path: (h.path(owner.split(":")[0]) + ":" + h.path(owner.split(":")[1]), mode)
            for path, owner, mode in re.findall(
                r"^\| `([^`]+)` \| `([^`]+)` \| `(0\d{3})` \|",
                RUNBOOK.read_text(encoding="utf-8"),
                re.M,
            )
        }
        assert {p: table[p] for p in where} == {p: _owner_and_mode(w) for p, w in where.items()}
    finally:
        assert 0 == _stop(daemon)
