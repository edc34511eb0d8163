"""tp2 graded end to end: SeaweedFS, the real daemon, bubblewrap sandboxes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd import AssetdClient
from assetd.grader import AssetdBytesProvider, AssetSourceResolver
from tests.support.daemon import DaemonProcess, socket_dir, write_config
from tests.support.seaweedfs import SCOPED_BUCKET, SCOPED_KEY, SeaweedFS, ensure_bucket

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("bwrap") is None and not os.environ.get("CI"),
        reason="bubblewrap not installed (make test installs it)",
    ),
]

TP2 = Path(__file__).resolve().parents[2] / "examples" / "tp2"
sys.path.insert(0, str(TP2))
import dataset  # noqa: E402
import grade  # noqa: E402

BUCKET = SCOPED_BUCKET
KEY = "datasets/tp2/RESTAURANTES.CSV"
SETUP = json.loads((TP2 / "setup.json").read_text())
BIG = os.urandom(20 * 1000 * 1000)
PROBE = """
import hashlib, json, os, socket, stat, sys
out = {"env": sorted(os.environ), "ifaces": [n for _, n in socket.if_nameindex()]}
for target in sys.argv[1:]:
    data = open(target, "rb").read()
    try:
        with open(target, "ab") as f:
            f.write(b"tamper")
        write = "ok"
    except OSError as exc:
        write = exc.errno
    # chmod asks the mount before the file's owner or mode: EROFS on a read-only mount,
    # whatever the mode; the same mode again leaves the file as it was if it succeeds
    try:
        os.chmod(target, stat.S_IMODE(os.stat(target).st_mode))
        chmod = "ok"
    except OSError as exc:
        chmod = exc.errno
    read_only_mount = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
    out[target] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "write": write,
        "chmod": chmod,
        "read_only_mount": read_only_mount,
    }
print(json.dumps(out))
"""


WRITABLE = ("write", "chmod", "read_only_mount")


@pytest.fixture(scope="module")
def tp2_daemon(seaweedfs: SeaweedFS) -> Iterator[DaemonProcess]:
    admin = seaweedfs.client()
    ensure_bucket(admin, BUCKET)
    admin.put_object(Bucket=BUCKET, Key=KEY, Body=dataset.generate())
    admin.put_object(Bucket=BUCKET, Key="datasets/big/twenty.bin", Body=BIG)
    admin.put_object(Bucket=BUCKET, Key="datasets/huge.bin", Body=os.urandom(22 * 1000 * 1000))
    with tempfile.TemporaryDirectory(prefix="ag", dir="/tmp") as tmp:
        base = socket_dir(Path(tmp))
        config = write_config(
            base / "assetd.toml",
            {
                "daemon": {"socket": str(base / "a.sock")},
                "cache": {"dir": str(base / "cache")},
                "s3": {
                    "endpoint_url": seaweedfs.endpoint_url,
                    "region": "us-east-1",
                    "addressing_style": "path",
                    "allowed_buckets": [BUCKET],
                    "allowed_prefixes": ["datasets/"],
                    "max_object_bytes": "21MB",
                },
            },
        )
        proc = DaemonProcess(
            config,
            str(base / "a.sock"),
            base / "assetd.log",
            env={"AWS_ACCESS_KEY_ID": SCOPED_KEY[0], "AWS_SECRET_ACCESS_KEY": SCOPED_KEY[1]},
        )
        with proc:
            yield proc


@pytest.fixture
def resolver(tp2_daemon: DaemonProcess) -> Iterator[AssetSourceResolver]:
    with AssetdClient(tp2_daemon.socket_path) as client:
        yield AssetSourceResolver(client=client)


def test_reference_passes_and_wrong_fails(resolver: AssetSourceResolver) -> None:
    """The reference solution passes and the wrong one fails, graded in bubblewrap."""
    reference = grade.grade(TP2 / "solutions" / "reference.py", SETUP, resolver)
    wrong = grade.grade(TP2 / "solutions" / "wrong.py", SETUP, resolver)
    assert ("pass", "fail") == (reference.status, wrong.status)
    assert "hit" == wrong.cache[0]


def _probe(resolver: AssetSourceResolver, setup: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    assets = grade.preflight(resolver, setup, job="probe")
    placed = grade.place_copies(assets, tmp_path)
    targets = [a.spec.target for a in assets]
    proc = grade.run_student(placed, script, ["python3", "/work/solution.py", *targets])
    assert 0 == proc.returncode, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_sandbox_reads_asset_cannot_write_has_no_credentials_or_network(
    resolver: AssetSourceResolver, tmp_path: Path
) -> None:
    """In the sandbox: the asset reads, writing fails, no AWS_ variables, only lo."""
    out = _probe(resolver, SETUP, tmp_path)
    asset = out["/tmp/RESTAURANTES.CSV"]
    assert hashlib.sha256(dataset.generate()).hexdigest() == asset["sha256"]
    # EACCES: the blob is 0444 and the sandbox has no capabilities; EROFS behind that
    assert asset["write"] in (errno.EACCES, errno.EROFS)


def test_the_mount_itself_is_read_only_whatever_the_file_mode(
    resolver: AssetSourceResolver, tmp_path: Path
) -> None:
    """The mount is read-only: chmod gets EROFS and statvfs says ST_RDONLY, whatever the mode."""
    out = _probe(resolver, SETUP, tmp_path)
    asset = out["/tmp/RESTAURANTES.CSV"]
    assert (errno.EROFS, True) == (asset["chmod"], asset["read_only_mount"])
    assert [] == [name for name in out["env"] if name.startswith("AWS_")]
    assert ["lo"] == out["ifaces"]


def test_twenty_megabyte_asset(resolver: AssetSourceResolver, tmp_path: Path) -> None:
    """A 20 MB asset is placed and read whole, beyond any argv-based approach."""
    setup = {
        "assets": [{"source": f"s3://{BUCKET}/datasets/big/twenty.bin", "target": "/data/t.bin"}]
    }
    out = _probe(resolver, setup, tmp_path)
    assert hashlib.sha256(BIG).hexdigest() == out["/data/t.bin"]["sha256"]


def test_writable_asset_is_a_private_copy(
    resolver: AssetSourceResolver, tmp_path: Path, tp2_daemon: DaemonProcess
) -> None:
    """read_only: false gets a writable copy; the cache blob is never changed."""
    setup = {
        "assets": [{"source": f"s3://{BUCKET}/{KEY}", "target": "/tmp/R.CSV", "read_only": False}]
    }
    out = _probe(resolver, setup, tmp_path)
    blob = tp2_daemon.request({"op": "resolve", "source": f"s3://{BUCKET}/{KEY}"})
    assert ("ok", "ok", False) == tuple(out["/tmp/R.CSV"][k] for k in WRITABLE)
    assert hashlib.sha256(dataset.generate()).hexdigest() == blob["sha256"]
    assert dataset.generate() == Path(blob["path"]).read_bytes()


@pytest.mark.parametrize(
    ("source", "code"),
    [
        (f"s3://{BUCKET}/datasets/tp2/MISSING.CSV", "not_found"),
        ("s3://not-our-bucket/datasets/x.csv", "not_allowed"),
        (f"s3://{BUCKET}/datasets/huge.bin", "too_large"),
    ],
)
def test_preflight_fails_before_student_code(
    resolver: AssetSourceResolver,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    code: str,
) -> None:
    """A missing, disallowed or oversize asset fails pre-flight; no student command runs."""
    ran: list[object] = []
    monkeypatch.setattr(grade, "run_student", lambda *a, **k: ran.append(a))
    setup = {"assets": [*SETUP["assets"], {"source": source, "target": "/tmp/extra.bin"}]}
    verdict = grade.grade(TP2 / "solutions" / "reference.py", setup, resolver)
    assert ("error", []) == (verdict.status, ran)
    assert [(source, "/tmp/extra.bin", code)] == [
        (f["source"], f["target"], f["code"]) for f in verdict.preflight
    ]


def test_bytes_provider_returns_exact_bytes(tp2_daemon: DaemonProcess) -> None:
    """The get_asset bytes provider returns exactly the object's bytes, None on failure."""
    with AssetdClient(tp2_daemon.socket_path) as client:
        provider = AssetdBytesProvider(client)
        data = provider.get_asset(f"s3://{BUCKET}/{KEY}", "/tmp/RESTAURANTES.CSV", True)
        missing = provider.get_asset(f"s3://{BUCKET}/datasets/nope.csv", "/tmp/n.csv", True)
        code = provider.last_error.code if provider.last_error else None
    assert dataset.generate() == data
    assert (None, "not_found") == (missing, code)


def test_bytes_provider_raising_mode_and_legacy_bucket(tp2_daemon: DaemonProcess) -> None:
    """As the autograder would wire it: bare keys from legacy_bucket, coded errors raised."""
    with AssetdBytesProvider(
        socket_path=tp2_daemon.socket_path, legacy_bucket=BUCKET, raise_errors=True
    ) as provider:
        data = provider.get_asset(KEY, "/tmp/RESTAURANTES.CSV", True, job="e2e")
        with pytest.raises(RuntimeError) as info:
            provider.get_asset("datasets/nope.csv", "/tmp/n.csv")
    assert dataset.generate() == data
    assert "/tmp/n.csv: not_found: " == str(info.value)[: len("/tmp/n.csv: not_found: ")]


def test_blob_removed_before_the_sandbox_is_an_infra_verdict(
    resolver: AssetSourceResolver, monkeypatch: pytest.MonkeyPatch, tp2_daemon: DaemonProcess
) -> None:
    """The daemon's blob removed after resolve (as gc once did): infra verdict, no host path."""
    build = grade.sandbox_argv
    removed: list[Path] = []

    def build_then_remove(placed: list[Any], *args: Any, **kwargs: Any) -> list[str]:
        argv: list[str] = build(placed, *args, **kwargs)
        for p in placed:
            if not p.writable:
                p.host_path.unlink()
                removed.append(p.host_path)
        return argv

    monkeypatch.setattr(grade, "sandbox_argv", build_then_remove)
    verdict = grade.grade(TP2 / "solutions" / "reference.py", SETUP, resolver)
    printed = verdict.line() + json.dumps(verdict.__dict__)
    assert ("infra", 1) == (verdict.status, len(removed))
    assert "/tmp/RESTAURANTES.CSV" in verdict.detail
    assert [] == [p for p in (str(removed[0]), str(tp2_daemon.socket_path)) if p in printed]
    assert "/blobs/" not in printed
    monkeypatch.undo()
    again = grade.grade(TP2 / "solutions" / "reference.py", SETUP, resolver)
    assert ("pass", ["miss"]) == (again.status, again.cache)  # the daemon fetched it again
