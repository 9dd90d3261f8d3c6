"""Shared fixtures: a real S3 endpoint (moto's HTTP server on 127.0.0.1), temp dirs, helpers."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        path = str(item.fspath)
        for kind in ("integration", "fault", "gpu", "ranks"):
            if f"{os.sep}{kind}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, kind))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint); yields its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    yield f"http://{host}:{port}"
    srv.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3's standard configuration at the local server; yields the endpoint URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


@pytest.fixture
def bucket(s3_env: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the local server."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", f"t-{uuid.uuid4().hex[:8]}-{request.node.name.lower()}")[:63].rstrip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name
