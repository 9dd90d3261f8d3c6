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

from spotckpt.errors import UploadError
from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname
from spotckpt.remote.s3 import S3Store, make_client
from spotckpt.policy import KeepLast
from spotckpt.remote.uploader import Uploader
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
    up = Uploader(local, store, retention=KeepLast(1))
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
    from spotckpt.remote.s3 import S3Store
    from spotckpt.remote.uploader import Uploader
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


# --------------------------------------------------------------------------------------------
# A real server checks what moto does not: CRC32C of every part and object, If-None-Match: *.

REAL = pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)


def _no_trace_of(store: S3Store, bucket: str, step: int) -> None:
    """Nothing of ``step`` counts in S3, and no multipart upload is left behind."""
    assert step not in store.list_steps()
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


@REAL
def test_real_server_refuses_a_wrong_part_checksum(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/parts", transfer_config=SMALL_PARTS, retry_attempts=3, retry_backoff_seconds=0.01)
    local = tmp_path / "ckpt"
    make_step(local, 1, 12 * MiB, nfiles=1)  # 3 parts of 5 MiB

    def wrong_crc(params: dict, **_: object) -> None:  # runs after spotckpt's own part-CRC hook
        if params.get("PartNumber") == 2:
            params["ChecksumCRC32C"] = "AAAAAA=="

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", wrong_crc)
    with pytest.raises(UploadError, match=r"do not match their CRC32C \(BadDigest\).*Nothing of this step was committed") as ei:
        store.upload_step(1, local / step_dirname(1))
    assert ei.value.key == "parts/step-000000000001/rank-00000.safetensors"
    assert "after" not in str(ei.value)  # a 400 is final: not retried
    _no_trace_of(store, bucket, 1)
    assert "Contents" not in store.client.list_objects_v2(Bucket=bucket, Prefix=ei.value.key)


@REAL
@pytest.mark.parametrize("nbytes", [64 * 1024, 12 * MiB], ids=["put", "multipart"])
def test_real_server_refuses_an_object_that_does_not_match_its_manifest_crc(bucket: str, tmp_path: Path, nbytes: int) -> None:
    """The local file changed after its manifest was written (same size): the object goes up
    with the manifest's CRC32C (single PUT, or the full-object checksum of a multipart upload),
    and a server that checks refuses it -- moto would store it, and only a download would tell."""
    store = S3Store(f"s3://{bucket}/obj", transfer_config=SMALL_PARTS, retry_attempts=3, retry_backoff_seconds=0.01)
    local = tmp_path / "ckpt"
    make_step(local, 1, 32 * 1024, nfiles=1)
    Uploader(local, store).sync_once()  # an older committed step, which must stay valid
    make_step(local, 2, nbytes, nfiles=1)
    path = local / step_dirname(2) / "rank-00000.safetensors"
    with open(path, "r+b") as f:
        f.seek(nbytes // 2)
        b = f.read(1)
        f.seek(nbytes // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(UploadError, match=r"BadDigest") as ei:
        store.upload_step(2, local / step_dirname(2))
    assert ei.value.key == "obj/step-000000000002/rank-00000.safetensors"
    _no_trace_of(store, bucket, 2)
    assert store.list_steps() == [1] and store.verify_step(1) == []
    assert "Contents" not in store.client.list_objects_v2(Bucket=bucket, Prefix=ei.value.key)


def _race(stores: list[S3Store], dirs: list[Path], step: int) -> list[object]:
    """Both stores upload ``step``; their manifest PUTs are held until both are about to send,
    so both pass the "already committed?" check and only If-None-Match: * decides."""
    barrier = threading.Barrier(len(stores))

    def hold(params: dict, **_: object) -> None:
        if params["Key"].endswith(MANIFEST_NAME) and "IfNoneMatch" in params:
            barrier.wait()

    results: list[object] = [None] * len(stores)

    def run(i: int) -> None:
        try:
            results[i] = stores[i].upload_step(step, dirs[i])
        except BaseException as exc:  # noqa: BLE001 - collected for the asserts
            results[i] = exc
            barrier.abort()  # never leave the other writer waiting

    for st in stores:
        st.client.meta.events.register("before-parameter-build.s3.PutObject", hold)
    threads = [threading.Thread(target=run, args=(i,), name=f"writer-{i}") for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@REAL
def test_real_server_conditional_manifest_write_same_manifest_is_idempotent(bucket: str, tmp_path: Path) -> None:
    """Two writers (e.g. a retry racing its own first attempt) commit the same step with the
    same manifest: one commits it, the other finds it already there; no error."""
    uri = f"s3://{bucket}/same"
    local = tmp_path / "ckpt"
    man = make_step(local, 5, 32 * 1024)
    results = _race([S3Store(uri), S3Store(uri)], [local / step_dirname(5)] * 2, 5)
    assert sorted(results, key=str) == [False, True], results
    store = S3Store(uri)
    assert store.read_manifest(5) == man and store.verify_step(5) == []


@REAL
def test_real_server_conditional_manifest_write_loses_the_race_cleanly(bucket: str, tmp_path: Path) -> None:
    """Two writers commit the same step with different manifests (same data, different writer
    info): exactly one commits; the other gets an UploadError naming the key and saying what to
    do, and the committed step is the winner's and verifies."""
    import shutil

    uri = f"s3://{bucket}/race"
    a = tmp_path / "a"
    man_a = make_step(a, 6, 32 * 1024)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    man_b = Manifest(step=6, files=dict(man_a.files), created=man_a.created, extra={"writer": "b"})
    (b / step_dirname(6) / MANIFEST_NAME).write_bytes(man_b.to_bytes())
    results = _race([S3Store(uri), S3Store(uri)], [a / step_dirname(6), b / step_dirname(6)], 6)
    winners = [i for i, r in enumerate(results) if r is True]
    losers = [r for r in results if isinstance(r, UploadError)]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "another writer" in str(losers[0]) and "separate S3 prefix" in str(losers[0])
    assert losers[0].key == "race/step-000000000006/manifest.json"
    store = S3Store(uri)
    assert store.read_manifest(6) == (man_a, man_b)[winners[0]]
    assert store.verify_step(6) == []


def _client_error(code: str, status: int, op: str = "PutObject") -> bce.ClientError:
    return bce.ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)


@pytest.mark.parametrize(
    ("exc", "retryable", "says"),
    [
        (_client_error("SlowDown", 503), True, "throttling"),
        (_client_error("WeirdNew5xx", 502), True, "throttling"),
        (_client_error("RequestTimeTooSkewed", 403), True, "clock"),
        (_client_error("AccessDenied", 403), False, "grant s3:ListBucket"),
        (_client_error("403", 403, "HeadObject"), False, "access denied"),
        (_client_error("BadDigest", 400), False, "CRC32C"),
        (_client_error("PreconditionFailed", 412), False, "another writer"),
        (_client_error("NotImplemented", 501), False, "does not support"),
        (_client_error("NoSuchBucket", 404), False, "create it"),
        (_client_error("404", 404, "HeadObject"), False, "does not exist"),
        (bce.EndpointConnectionError(endpoint_url="http://x"), True, "cannot reach"),
        (bce.ConnectionClosedError(endpoint_url="http://x"), True, "connection"),
        (bce.NoCredentialsError(), False, "AWS_ACCESS_KEY_ID"),
        (ConnectionResetError(), True, "connection"),
        (FileNotFoundError(), False, "FileNotFoundError"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_s3_failures_are_looked_up_in_one_table(exc: BaseException, retryable: bool, says: str) -> None:
    from spotckpt.remote.s3 import _is_retryable

    store = S3Store("s3://some-bucket/p", client=make_client())
    assert _is_retryable(exc) is retryable
    err = store.requests.storage_error(exc, "p/step-000000000001/x", UploadError)
    assert isinstance(err, UploadError) and err.key == "p/step-000000000001/x"
    assert says in str(err)
