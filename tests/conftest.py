"""Shared fixtures. Every test process talks to loopback S3 with test credentials only."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from assetd.fetcher.memory import MemoryFetcher
from tests.support.docker import Dockerd
from tests.support.docker import missing as missing_docker
from tests.support.faultproxy import FaultProxy
from tests.support.seaweedfs import SeaweedFS
from tests.support.service import Env

# These machines set CA bundles and may hold real AWS settings; none of it
# may leak into tests that talk to loopback S3.
_SCRUB_PREFIXES = ("AWS_", "BOTO_")
_SCRUB = {
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "SSL_CERT_FILE",
    "ASSETD_CONFIG",
    "ASSETD_SOCKET",
    "ASSETD_CACHE_DIR",
}
for _name in list(os.environ):
    if _name.startswith(_SCRUB_PREFIXES) or _name in _SCRUB or _name.startswith("ASSET_S3_"):
        del os.environ[_name]
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)


@pytest.fixture
def cache_dir(tmp_path: os.PathLike[str]) -> str:
    """A fresh cache directory."""
    path = os.path.join(tmp_path, "cache")
    return path


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real moto S3 server over HTTP on loopback (API behaviour only, never benchmarks)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One real SeaweedFS (`weed mini`) per test session, credentials enforced."""
    with SeaweedFS() as weed:
        yield weed


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the moto server."""
    port = int(moto_server.rsplit(":", 1)[1])
    proxy = FaultProxy(port).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A socket path in tmp_path, short enough for AF_UNIX."""
    path = str(tmp_path / "d.sock")
    assert len(path) < 100, path
    return path


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    """One real dockerd per session (vfs, no bridge); skips where Docker cannot run."""
    reason = missing_docker()
    engine = Dockerd()
    if reason is None:
        try:
            engine.start()
        except RuntimeError as exc:  # installed but cannot run here (no privileges, no cgroups)
            reason = f"dockerd did not start: {exc}"
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"Docker tests cannot run in CI: {reason}")
        pytest.skip(reason)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def make_env(tmp_path: Path) -> Iterator[Callable[..., Env]]:
    """A factory for service Envs (tests/support/service.py), all closed after the test."""
    made: list[Env] = []

    def make(fetcher: MemoryFetcher | None = None, **kwargs: Any) -> Env:
        env = Env(tmp_path / f"env{len(made)}", fetcher, **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()
