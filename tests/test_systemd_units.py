"""The shipped systemd units pass `systemd-analyze verify` with no output on stderr."""

# House style puts the expected value on the left of ==.

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
PRODUCTION_BINARY = "ExecStart=/usr/bin/assetd "


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


def _verifiable_copies(dest: Path) -> tuple[Path, Path]:
    """Copies of both units that verify on a machine where assetd is not installed.

    The one adjustment: verify fails when ExecStart's binary does not exist,
    and /usr/bin/assetd exists only on a production host, so the copy starts
    this test's Python interpreter instead; the arguments stay as shipped.
    Nothing else changes: verify does not look up User=, Group=, SocketUser=
    or SocketGroup=, so the missing assetd user and groups need no stand-in.
    Both files keep their names and share a directory, which is how verify
    pairs assetd.socket with assetd.service.
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
