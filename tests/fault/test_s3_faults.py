"""S3 faults: injected 5xx / throttling / connection resets, request order, kill -9 mid-upload."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import botocore.exceptions as bce
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.awsrequest import AWSResponse

from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname
from spotckpt.s3 import S3Store, make_client
from spotckpt.uploader import Uploader
from tests.helpers import write_step

# Every S3 test here runs against moto and a real server (SeaweedFS); see tests/conftest.py.
S3_SERVERS = ("moto", "seaweedfs")

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
SMALL_PARTS = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)


def make_step(root: Path, step: int, nbytes: int, *, nfiles: int = 2) -> Manifest:
    return write_step(root, step, nbytes, nfiles=nfiles)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: object):  # noqa: ANN201
        yield self._body


class FaultInjector:
    """A botocore ``before-send`` hook failing a fraction of requests: 503 SlowDown, 500
    InternalError, or a connection reset (ConnectionClosedError)."""

    def __init__(self, fraction: float, seed: int = 1) -> None:
        self.fraction = fraction
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.injected = {"503": 0, "500": 0, "reset": 0}
        self.requests = 0

    def __call__(self, request, **_: object):  # noqa: ANN001, ANN204
        with self.lock:
            self.requests += 1
            if self.rng.random() >= self.fraction:
                return None
            kind = self.rng.choice(["503", "500", "reset"])
            self.injected[kind] += 1
        if kind == "reset":
            raise bce.ConnectionClosedError(endpoint_url=request.url)
        code, status = ("SlowDown", 503) if kind == "503" else ("InternalError", 500)
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw(body))


def test_uploads_and_downloads_complete_despite_injected_faults(bucket: str, tmp_path: Path) -> None:
    # botocore retries once only, so many faults reach the store's own retry loop
    client = make_client(max_attempts=2)
    faults = FaultInjector(0.3)
    client.meta.events.register("before-send.s3", faults)
    store = S3Store(f"s3://{bucket}/f", client=client, transfer_config=SMALL_PARTS, retry_attempts=8, retry_backoff_seconds=0.05)
    local = tmp_path / "ckpt"
    mans = {s: make_step(local, s, 6 * MiB) for s in (1, 2)}
    up = Uploader(local, store, keep_last=1)
    up.sync_once()
    assert store.list_steps() == [2]
    got = store.download_step(2, tmp_path / "restore")
    faults.fraction = 0.0
    assert got == mans[2]
    assert all(v > 0 for v in faults.injected.values()), faults.injected
    for rel in got.files:
        assert (tmp_path / "restore" / rel).read_bytes() == (local / step_dirname(2) / rel).read_bytes()
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_every_data_object_completes_before_its_manifest(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/o", transfer_config=SMALL_PARTS)
    completed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def after_call(http_response, model, **_: object) -> None:  # noqa: ANN001
        if model.name in ("PutObject", "CompleteMultipartUpload") and http_response.status_code == 200:
            key = http_response.url.split("/o/", 1)[1].split("?", 1)[0]
            with lock:
                completed.append((model.name, key))

    store.client.meta.events.register("after-call.s3", after_call)
    local = tmp_path / "ckpt"
    mans = {s: make_step(local, s, 7 * MiB, nfiles=3) for s in (1, 2)}
    Uploader(local, store).sync_once()
    keys = [k for _, k in completed]
    assert {op for op, _ in completed} == {"PutObject", "CompleteMultipartUpload"}
    for s, man in mans.items():
        man_idx = keys.index(f"{step_dirname(s)}/{MANIFEST_NAME}")
        for rel in man.files:
            assert keys.index(f"{step_dirname(s)}/{rel}") < man_idx
    assert keys[-1].endswith(MANIFEST_NAME)


KILLED_UPLOADER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from boto3.s3.transfer import TransferConfig
    from spotckpt.s3 import S3Store
    from spotckpt.uploader import Uploader
    cfg = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20, max_concurrency=2)
    store = S3Store(sys.argv[2], transfer_config=cfg)
    def slow(request, **kw):
        if "partNumber=" in request.url:
            print("PART", flush=True)
            time.sleep(0.2)
    store.client.meta.events.register("before-send.s3", slow)
    Uploader(Path(sys.argv[1]), store).sync_once()
    print("DONE", flush=True)
    """
)


def test_uploader_killed_mid_upload_leaves_no_manifest_over_incomplete_data(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    uri = f"s3://{bucket}/k"
    store = S3Store(uri)
    make_step(local, 1, 64 * 1024)
    Uploader(local, store).sync_once()  # one step already committed in S3
    make_step(local, 2, 30 * MiB)
    script = tmp_path / "uploader.py"
    script.write_text(KILLED_UPLOADER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(local), uri], env=env, stdout=subprocess.PIPE)
    try:
        parts = 0
        assert proc.stdout is not None
        while parts < 4:  # mid-way through step 2's multipart uploads
            line = proc.stdout.readline()
            assert line, "uploader exited before the kill"
            assert line.strip() != b"DONE"
            parts += line.strip() == b"PART"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    # invariant: every committed S3 step verifies; the killed one is not committed
    assert store.list_steps() == [1]
    store.download_step(1, tmp_path / "v1")
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads")  # the kill left one dangling
    # a restarted uploader just continues and cleans up
    assert store.cleanup_incomplete_uploads(older_than_seconds=0) >= 1
    Uploader(local, store).sync_once()
    assert store.list_steps() == [1, 2]
    store.download_step(2, tmp_path / "v2")
    assert not store.client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_upload_gives_up_with_upload_error_naming_the_key(bucket: str, tmp_path: Path) -> None:
    from spotckpt.errors import UploadError

    client = make_client(max_attempts=1)
    faults = FaultInjector(1.0)
    store = S3Store(f"s3://{bucket}/g", client=client, retry_attempts=2, retry_backoff_seconds=0.01)
    local = tmp_path / "ckpt"
    make_step(local, 3, 1024, nfiles=1)
    client.meta.events.register("before-send.s3", lambda request, **kw: faults(request) if request.method == "PUT" else None)
    with pytest.raises(UploadError, match="after 2 attempts") as ei:
        store.upload_step(3, local / step_dirname(3))
    assert "step-000000000003/" in ei.value.key
    assert store.list_steps() == []
