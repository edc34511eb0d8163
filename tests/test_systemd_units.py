"""The shipped systemd units: `systemd-analyze verify` is silent, and
`systemd-analyze security --offline=true` rates the service 2.0 or better.

Both run on copies of the units (see ``_verifiable_copies``); the hardening
choices that docs/operations.md explains are pinned by the tests at the end.
"""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
PRODUCTION_BINARY = "ExecStart=/opt/assetd/bin/assetd "
MAX_EXPOSURE = 2.0
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ")


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = "systemd-analyze is not installed (Debian: apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_systemd_analyze(), "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _exposure(unit: Path) -> tuple[float, str]:
    """The overall exposure `security --offline=true` gives ``unit``, and its full report."""
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = _EXPOSURE.search(result.stdout)
    assert found is not None, f"no overall exposure in: {result.stdout}{result.stderr}"
    return float(found.group(1)), result.stdout


def _verifiable_copies(dest: Path) -> tuple[Path, Path]:
    """Copies of both units that verify on a machine where assetd is not installed.

    The one adjustment: verify fails when ExecStart's binary does not exist,
    and /opt/assetd/bin/assetd exists only on a production host, so the copy
    starts this test's Python interpreter instead; the arguments stay as
    shipped. Nothing else changes: verify does not look up User=, Group=,
    SocketUser= or SocketGroup=, so the missing assetd user and groups need no
    stand-in. Both files keep their names and share a directory, which is how
    verify pairs assetd.socket with assetd.service.
    """
    service = (UNITS / "assetd.service").read_text(encoding="utf-8")
    assert 1 == service.count(PRODUCTION_BINARY)
    service_copy = dest / "assetd.service"
    service_copy.write_text(
        service.replace(PRODUCTION_BINARY, f"ExecStart={sys.executable} "), encoding="utf-8"
    )
    socket_copy = dest / "assetd.socket"
    shutil.copyfile(UNITS / "assetd.socket", socket_copy)
    return service_copy, socket_copy


def _settings(name: str) -> dict[str, list[str]]:
    """``Key`` -> every value it is given in the shipped unit ``name`` (comments dropped)."""
    found: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_units_pass_verify(tmp_path: Path) -> None:
    """Both units verify with exit status 0 and nothing at all on stderr."""
    result = _verify(*_verifiable_copies(tmp_path))
    assert (0, "") == (result.returncode, result.stderr)


def test_verify_reports_a_bad_key(tmp_path: Path) -> None:
    """An unknown key shows up on stderr, so a clean run above means something."""
    service, sock = _verifiable_copies(tmp_path)
    service.write_text(
        service.read_text(encoding="utf-8").replace("[Service]\n", "[Service]\nNoSuchKey=1\n"),
        encoding="utf-8",
    )
    result = _verify(service, sock)
    assert "NoSuchKey" in result.stderr  # the wording varies between systemd versions


def test_security_exposure_at_most_2(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true` rates the service 2.0 or lower."""
    service, _sock = _verifiable_copies(tmp_path)
    exposure, report = _exposure(service)
    assert exposure <= MAX_EXPOSURE, report


def test_operations_doc_states_the_exposure(tmp_path: Path) -> None:
    """docs/operations.md quotes the exposure that systemd-analyze gives today."""
    service, _sock = _verifiable_copies(tmp_path)
    exposure, _report = _exposure(service)
    doc = (UNITS.parent / "docs" / "operations.md").read_text(encoding="utf-8")
    quoted = re.search(r"`systemd-analyze security assetd.service` rates it (\d+\.\d)", doc)
    assert quoted is not None
    assert f"{exposure:.1f}" == quoted.group(1)


def test_security_check_can_fail(tmp_path: Path) -> None:
    """The same check on the unit stripped of its [Service] hardening rates it over 2.0."""
    service, _sock = _verifiable_copies(tmp_path)
    text = service.read_text(encoding="utf-8")
    bare = text.split("# Resources.", 1)[0] + "[Install]\nWantedBy=multi-user.target\n"
    service.write_text(bare, encoding="utf-8")
    exposure, report = _exposure(service)
    assert exposure > MAX_EXPOSURE, report


def test_service_identity_and_directories() -> None:
    """User assetd with primary group assetd-graders; cache and socket dirs as documented."""
    s = _settings("assetd.service")
    expected = {
        "Type": ["notify"],
        "User": ["assetd"],
        "Group": ["assetd-graders"],
        "CacheDirectory": ["assetd"],
        "CacheDirectoryMode": ["0750"],
        "RuntimeDirectory": ["assetd"],
        "RuntimeDirectoryMode": ["0755"],
        "UMask": ["0027"],
    }
    assert expected == {key: s.get(key) for key in expected}
    assert 1 == len(s["WatchdogSec"])
    assert int(s["WatchdogSec"][0]) > 0


def test_service_hardening_settings() -> None:
    """No capabilities, the three address families, the syscall allow list, no user namespace."""
    s = _settings("assetd.service")
    assert [""] == s["CapabilityBoundingSet"]
    assert ["AF_UNIX AF_INET AF_INET6"] == s["RestrictAddressFamilies"]
    assert "@system-service" == s["SystemCallFilter"][0]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert ["yes"] == s[key], key
    assert ["strict"] == s["ProtectSystem"]
    assert "MemoryMax" in s
    # PrivateUsers= would turn every peer uid into 65534 (SO_PEERCRED), and
    # ProtectProc=invisible hides the peers' supplementary groups; S3 needs the network
    assert set() == {"PrivateUsers", "ProtectProc", "IPAddressDeny", "PrivateNetwork"} & set(s)


def test_credentials_only_from_a_root_only_env_file() -> None:
    """The unit names an optional credentials file and holds no secret itself."""
    s = _settings("assetd.service")
    assert ["-/etc/assetd/credentials.env"] == s["EnvironmentFile"]
    text = (UNITS / "assetd.service").read_text(encoding="utf-8")
    assert None is re.search(r"^\s*Environment=.*AWS_", text, re.MULTILINE)


def test_socket_matches_service() -> None:
    """The socket unit's path, owner, group and directory mode agree with the service."""
    service, sock = _settings("assetd.service"), _settings("assetd.socket")
    assert [f"ASSETD_SOCKET={sock['ListenStream'][0]}"] == service["Environment"]
    assert "/run/" + service["RuntimeDirectory"][0] == os.path.dirname(sock["ListenStream"][0])
    assert (service["User"], service["Group"]) == (sock["SocketUser"], sock["SocketGroup"])
    assert ["0660"] == sock["SocketMode"]
    assert service["RuntimeDirectoryMode"] == sock["DirectoryMode"]
