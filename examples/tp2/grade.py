"""tp2's grader: pre-flight assets through assetd, run the student in bubblewrap.

    python examples/tp2/grade.py SOLUTION.py [...] [--socket PATH] [--setup setup.json] [--out DIR]

For each solution:

1. pre-flight: parse the setup config's ``assets``, resolve them all through
   the daemon (all or nothing); a failure ends here, before any student
   command runs, with each asset's stable code and message;
2. place: the cache blob bind-mounted read-only at its target;
3. run: ``python3 /work/solution.py`` in bubblewrap with no network
   (``--unshare-net``), an empty environment (``--clearenv``), a tmpfs
   ``/tmp``, and read-only system directories;
4. compare its output with the teacher's key, computed from the same bytes.

Verdicts: ``pass`` and ``fail`` are the student's; ``error`` is a setup
config or asset the teacher must fix; ``infra`` is an infrastructure fault
(daemon down, a cached file gone or changed before placement, a sandbox
that could not start): retry the job later, the student did nothing wrong.
Verdicts never carry a host path. Exit status: 0, 1 if any verdict is
``error``, else 75 (EX_TEMPFAIL) if any is ``infra``.

Each verdict carries the job's asset manifest (which bytes each asset was:
source, resolved source, version_id, ETag, sha256, size, cache status);
``--out DIR`` writes ``<solution>.verdict.json`` and, beside it,
``<solution>.manifest.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assetd import AssetdClient
from assetd.errors import AssetError, Unavailable, error_class
from assetd.grader import (
    AssetSourceResolver,
    PlacedAsset,
    PreflightError,
    ResolvedAsset,
    ResolvedAssets,
    bwrap_args,
    check_assets,
    parse_assets,
    place_copies,
)

HERE = Path(__file__).resolve().parent
DATASET_TARGET = "/tmp/RESTAURANTES.CSV"
RUN_TIMEOUT_S = 60
EX_TEMPFAIL = 75
log = logging.getLogger("tp2")


class SandboxDidNotStart(Exception):
    """bubblewrap exited before running the command: its setup (a mount) failed."""

    def __init__(self, stderr: str) -> None:
        super().__init__("the sandbox could not be set up")
        self.stderr = stderr  # bwrap's own words, with host paths: for the log only


@dataclass
class Verdict:
    solution: str
    status: str  # pass, fail (the student's), error (the setup config's), infra (retry later)
    detail: str = ""
    cache: list[str] = field(default_factory=list)
    seconds: float = 0.0
    preflight: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None  # the bytes this verdict was computed against

    def line(self) -> str:
        caches = ",".join(self.cache) or "-"
        return f"{self.status.upper():5} {self.solution}  [assets: {caches}]  {self.detail}"


def expected_output(csv_bytes: bytes) -> str:
    """The teacher's key, written independently of the reference solution."""
    rows = list(csv.DictReader(io.StringIO(csv_bytes.decode("utf-8"))))
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row["barrio"]].append(row)
    lines = []
    for barrio in sorted(groups):
        g = groups[barrio]
        rating = sum(float(r["puntuacion"]) for r in g) / len(g)
        price = sum(int(r["precio_medio"]) for r in g) / len(g)
        lines.append(
            f"{barrio}: {len(g)} restaurantes, puntuacion {rating:.2f}, precio {round(price)}"
        )
    best = sorted(
        (r for r in rows if r["tipo"] == "parrilla" and int(r["resenas"]) >= 100),
        key=lambda r: (-float(r["puntuacion"]), int(r["precio_medio"]), int(r["id"])),
    )[:3]
    lines += [
        f"top: {r['nombre']} ({r['barrio']}) {r['puntuacion']} ${r['precio_medio']}" for r in best
    ]
    return "\n".join(lines) + "\n"


def sandbox_argv(
    placed: list[PlacedAsset], solution: Path, command: list[str], *, status_fd: int | None = None
) -> list[str]:
    """bubblewrap: no network, no environment, read-only system, assets at their targets."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bubblewrap (bwrap) is not installed")
    # bwrap reports {"exit-code": N} there only once its setup (every mount) succeeded
    status = [] if status_fd is None else ["--json-status-fd", str(status_fd)]
    return [
        bwrap,
        "--unshare-net",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        # as root, bwrap keeps its capabilities: without this a student could
        # remount the read-only asset writable and rewrite the shared blob
        "--cap-drop", "ALL",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin",
        "--setenv", "HOME", "/tmp",
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/tmp",
        *bwrap_args(placed),  # after --tmpfs /tmp, or the tmpfs would hide them
        "--ro-bind", str(solution), "/work/solution.py",
        "--chdir", "/tmp",
        *status,
        *command,
    ]  # fmt: skip


def run_student(
    placed: list[PlacedAsset], solution: Path, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command in the sandbox; SandboxDidNotStart if bwrap failed before it ran.

    Whether the command started is read from bwrap's status fd, which the
    sandboxed program cannot reach: a student printing bwrap's error text
    still gets graded.
    """
    read_end, write_end = os.pipe()
    try:
        argv = sandbox_argv(
            placed, solution, command or ["python3", "/work/solution.py"], status_fd=write_end
        )
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
            check=False,
            env={},
            pass_fds=(write_end,),
        )
        os.close(write_end)
        write_end = -1
        with os.fdopen(read_end, "rb") as status:
            read_end = -1
            started = any(b'"exit-code"' in line for line in status)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
    if not started:
        raise SandboxDidNotStart(proc.stderr)
    return proc


def preflight(resolver: AssetSourceResolver, setup: dict[str, object], job: str) -> ResolvedAssets:
    """Every asset resolved, or PreflightError: nothing of the student's has run yet."""
    return resolver.resolve_assets(parse_assets(setup), job=job)


def _retryable(code: str) -> bool:
    try:
        return error_class(code).retryable
    except KeyError:  # a code from a newer daemon
        return False


def _infra(verdict: Verdict, what: str) -> Verdict:
    verdict.status = "infra"
    verdict.detail = f"infrastructure fault, retry later: {what}"
    return verdict


def grade(solution: Path, setup: dict[str, object], resolver: AssetSourceResolver) -> Verdict:
    started = time.monotonic()
    verdict = _grade(solution, setup, resolver)
    verdict.seconds = time.monotonic() - started
    return verdict


def _grade(solution: Path, setup: dict[str, object], resolver: AssetSourceResolver) -> Verdict:
    verdict = Verdict(solution.name, "error")
    try:
        assets = preflight(resolver, setup, job=f"tp2:{solution.name}")
    except AssetError as exc:  # the setup config itself is invalid
        verdict.detail = f"invalid setup config: {exc.code}: {exc.message}"
        return verdict
    except PreflightError as exc:
        verdict.preflight = [f.to_dict() for f in exc.failures]
        verdict.manifest = exc.manifest.to_dict()
        if all(_retryable(f.code) for f in exc.failures):
            # codes only: a client-side message may name the host's socket path
            verdict.preflight = [{**f, "message": None} for f in verdict.preflight]
            for row in verdict.manifest["assets"]:
                if row["error"] is not None:
                    row["error"] = {"code": row["error"]["code"], "message": None}
            return _infra(verdict, "; ".join(f"{f.target}: {f.code}" for f in exc.failures))
        verdict.detail = "pre-flight failed: " + "; ".join(
            f"{f.target}: {f.code}: {f.message}" for f in exc.failures
        )
        return verdict
    verdict.cache = [a.cache or "local" for a in assets]
    verdict.manifest = assets.manifest.to_dict()
    try:
        return _place_and_run(verdict, assets, solution)
    except AssetError as exc:  # placement found a cached file gone or changed: never a FAIL
        return _infra(verdict, f"{exc.code}: {exc.message}")


def _place_and_run(verdict: Verdict, assets: list[ResolvedAsset], solution: Path) -> Verdict:
    check_assets(assets)
    # the key comes from the bytes as resolved, before any student code runs
    dataset = next(a for a in assets if a.spec.target == DATASET_TARGET)
    try:
        data = dataset.path.read_bytes()
    except OSError:
        check_assets([dataset])
        raise Unavailable("the cached dataset cannot be read; retry the job") from None
    expected = expected_output(data)
    with tempfile.TemporaryDirectory(prefix="tp2-") as work:
        placed = place_copies(assets, work)
        try:
            proc = run_student(placed, solution)
        except subprocess.TimeoutExpired:
            verdict.status, verdict.detail = "fail", f"time limit of {RUN_TIMEOUT_S}s exceeded"
            return verdict
        except SandboxDidNotStart as exc:
            log.info("sandbox did not start: %s", exc.stderr.strip())
            check_assets(assets)  # an asset gone or changed says so, with its target
            raise Unavailable("the sandbox could not be set up; retry the job") from None
    if proc.returncode != 0:
        verdict.status = "fail"
        last = proc.stderr.strip().splitlines()[-1:] or [""]
        verdict.detail = f"exit {proc.returncode}: {last[0]}"
    elif proc.stdout == expected:
        verdict.status, verdict.detail = "pass", "output matches"
    else:
        got, want = proc.stdout.splitlines(), expected.splitlines()
        first = next(
            (i for i, (g, w) in enumerate(zip(got, want, strict=False)) if g != w),
            min(len(got), len(want)),
        )
        verdict.status = "fail"
        verdict.detail = f"line {first + 1} differs"
    return verdict


def write_verdict(verdict: Verdict, out: Path) -> tuple[Path, Path]:
    """``<solution>.verdict.json`` and, beside it, ``<solution>.manifest.json``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(verdict.solution).stem
    verdict_path, manifest_path = out / f"{stem}.verdict.json", out / f"{stem}.manifest.json"
    body = {k: v for k, v in verdict.__dict__.items() if k != "manifest"}
    verdict_path.write_text(json.dumps(body, indent=2) + "\n")
    manifest_path.write_text(json.dumps(verdict.manifest, indent=2) + "\n")
    return verdict_path, manifest_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("solutions", nargs="+", type=Path)
    parser.add_argument("--socket", default=None)
    parser.add_argument("--setup", type=Path, default=HERE / "setup.json")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write verdicts and manifests here")
    args = parser.parse_args()
    # the grader is the application: it sends assetd's library warnings to stderr
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    setup = json.loads(args.setup.read_text())
    with AssetdClient(args.socket) as client:
        resolver = AssetSourceResolver(client=client, local_root=args.setup.parent)
        verdicts = [grade(s.resolve(), setup, resolver) for s in args.solutions]
    for v in verdicts:
        print(json.dumps(v.__dict__) if args.json else v.line())
        if args.out is not None:
            write_verdict(v, args.out)
    if any(v.status == "error" for v in verdicts):
        return 1
    return EX_TEMPFAIL if any(v.status == "infra" for v in verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
