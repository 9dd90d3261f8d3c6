"""Upload while writing: a save's data file goes to S3 from memory during the local write; the
uploader finishes it (never uploading it again) and writes the manifest last; a failed local
write leaves nothing in S3; a failed early upload falls back to the committed file."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.exceptions as bce
import pytest
import torch
from boto3.s3.transfer import TransferConfig

from spotckpt import CheckpointManager
from spotckpt.core.local import LocalStore
from spotckpt.errors import SaveError
from spotckpt.format import FileEntry, crc32c_b64, crc32c_update
from spotckpt.remote.s3 import S3Store
from tests.helpers import assert_state_is_step, empty_state, step_state

S3_SERVERS = ("moto", "seaweedfs")

MiB = 1 << 20
DATA = "rank-00000.safetensors"
SAVER = Path(__file__).resolve().parents[1] / "fault" / "saver_child.py"
NUMEL = 3 * MiB  # 12 MiB of fp32: three 5 MiB parts (S3's smallest part size)


def small_parts_store(uri: str) -> S3Store:
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    return S3Store(uri, transfer_config=cfg)


class Recorder:
    """The S3 requests of a store in the order they were sent, and the local commit among them."""

    def __init__(self, store: S3Store) -> None:
        self.log: list[tuple[str, str, str]] = []  # (operation, key, thread name)
        self.lock = threading.Lock()
        self.parts_sent = threading.Event()
        self.parts = 0
        ev = store.client.meta.events
        ev.register("before-parameter-build.s3.*", self._before)
        ev.register("after-call.s3.UploadPart", self._after_part)

    def _before(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.log.append((model.name, params.get("Key", ""), threading.current_thread().name))

    def _after_part(self, **_: Any) -> None:
        with self.lock:
            self.parts += 1
            if self.parts == 3:
                self.parts_sent.set()

    def note(self, what: str) -> None:
        with self.lock:
            self.log.append((what, "", threading.current_thread().name))

    def ops(self, key_end: str) -> list[str]:
        return [op for op, key, _ in self.log if key.endswith(key_end) or op == "local-commit"]


@pytest.fixture
def commit_after_parts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Recorder]]:
    """The local rename waits until every part of the data file has been uploaded (so the test
    sees that they were sent during the write, from memory), then is recorded."""
    holder: list[Recorder] = []
    orig = LocalStore.commit

    def commit(self: LocalStore, staging: Path, manifest: Any) -> Path:
        rec = holder[0]
        assert rec.parts_sent.wait(120), "the parts were not uploaded while the step was being written"
        rec.note("local-commit")
        return orig(self, staging, manifest)

    monkeypatch.setattr(LocalStore, "commit", commit)
    yield holder


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
def test_save_uploads_during_the_write_once_and_manifest_last(tmp_path: Path, bucket: str, blocking: bool,
                                                              commit_after_parts: list[Recorder]) -> None:
    uri = f"s3://{bucket}/job"
    store = small_parts_store(uri)
    rec = Recorder(store)
    commit_after_parts.append(rec)
    state = {"w": torch.randn(NUMEL), "step": torch.tensor(7)}
    with CheckpointManager(tmp_path / "a", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        mgr.save(7, state, blocking=blocking)
        assert mgr.wait()
    data = rec.ops(DATA)
    # every part left before the local rename; the object completed after it; nothing sent twice
    assert data == ["CreateMultipartUpload", "UploadPart", "UploadPart", "UploadPart", "local-commit",
                    "CompleteMultipartUpload"], data
    assert all(t.startswith("spotckpt-s3-early") for op, k, t in rec.log if op == "UploadPart")
    writes = [(op, k) for op, k, _ in rec.log if op in ("PutObject", "CompleteMultipartUpload")]
    assert writes[-1] == ("PutObject", "job/step-000000000007/manifest.json")  # the manifest last
    assert S3Store(uri).verify_step(7) == []
    target = {"w": torch.zeros(NUMEL), "step": torch.tensor(0)}
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(target) == 7  # verified (CRC32C) on the way in
    assert torch.equal(target["w"], state["w"]) and int(target["step"]) == 7


@pytest.mark.parametrize("numel", [NUMEL, 1000], ids=["multipart", "one-put"])
def test_a_failed_local_write_leaves_nothing_in_s3(tmp_path: Path, bucket: str, numel: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{bucket}/job"
    store = small_parts_store(uri)
    rec = Recorder(store)
    sent = rec.parts_sent if numel == NUMEL else threading.Event()
    if numel != NUMEL:
        store.client.meta.events.register("after-call.s3.PutObject", lambda **_: sent.set())

    def commit(self: LocalStore, staging: Path, manifest: Any) -> Path:
        assert sent.wait(120), "nothing was uploaded while the step was being written"
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalStore, "commit", commit)
    with CheckpointManager(tmp_path / "a", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        with pytest.raises(SaveError, match="disk is full"):
            mgr.save(3, {"w": torch.randn(numel)}, blocking=True)
        # when save() raises, the early upload is gone: no object, no open multipart upload
        client = store.client
        assert client.list_objects_v2(Bucket=bucket, Prefix="job/").get("KeyCount", 0) == 0
        assert client.list_multipart_uploads(Bucket=bucket, Prefix="job/").get("Uploads", []) == []
        assert mgr.all_steps() == []
    assert S3Store(uri).list_steps() == []


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)
def test_a_failed_early_upload_falls_back_to_the_committed_file(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/job"
    store = small_parts_store(uri)
    rec = Recorder(store)

    def refuse_early_parts(**_: Any) -> None:
        if threading.current_thread().name.startswith("spotckpt-s3-early"):
            raise bce.ClientError({"Error": {"Code": "AccessDenied", "Message": "test"}}, "UploadPart")

    store.client.meta.events.register("before-call.s3.UploadPart", refuse_early_parts)
    state = {"w": torch.randn(NUMEL)}
    with CheckpointManager(tmp_path / "a", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        mgr.save(5, state, blocking=True)
        assert mgr.wait()
    data = rec.ops(DATA)
    assert "AbortMultipartUpload" in data and data[-1] == "CompleteMultipartUpload"
    assert store.client.list_multipart_uploads(Bucket=bucket, Prefix="job/").get("Uploads", []) == []
    assert S3Store(uri).verify_step(5) == []


@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)
def test_bytes_that_do_not_match_the_manifest_are_never_completed(bucket: str) -> None:
    store = small_parts_store(f"s3://{bucket}/job")
    data = torch.randn(NUMEL).numpy().view("uint8")
    up = store.start_upload(1, DATA, [b"header--", data])
    assert up is not None
    wrong = FileEntry(up.size, crc32c_b64(crc32c_update(0, b"other bytes")))
    assert up.finish(wrong) is False  # aborted: the caller uploads the committed file instead
    assert store.client.list_multipart_uploads(Bucket=bucket, Prefix="job/").get("Uploads", []) == []
    assert store.client.list_objects_v2(Bucket=bucket, Prefix="job/").get("KeyCount", 0) == 0
    store.close()


def test_the_setting_turns_it_off(tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTCKPT_UPLOAD_WHILE_WRITING", "0")
    uri = f"s3://{bucket}/job"
    store = small_parts_store(uri)
    rec = Recorder(store)
    with CheckpointManager(tmp_path / "a", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.pipeline is not None and not mgr.pipeline.upload_while_writing
        mgr.save(2, {"w": torch.randn(NUMEL)}, blocking=True)
        assert mgr.wait()
    assert not any(t.startswith("spotckpt-s3-early") for *_, t in rec.log)
    with CheckpointManager(tmp_path / "b", remote_store=small_parts_store(uri), metrics=False,
                           install_signal_handlers=False, upload_while_writing=True) as mgr:
        assert mgr.pipeline is not None and mgr.pipeline.upload_while_writing  # the argument wins


def test_the_chunks_are_the_bytes_of_the_written_file(tmp_path: Path) -> None:
    """What is uploaded from memory is byte for byte the file the local write produces (a
    mismatch would only cost the head start -- finish() compares CRCs -- but must not happen)."""
    from spotckpt.core.early_upload import host_chunks
    from spotckpt.format import write_safetensors

    tensors = {"b": torch.arange(5, dtype=torch.int64), "a": torch.randn(3, 4), "empty": torch.zeros(0),
               "flag": torch.tensor([True, False])}
    meta = {"format": "spotckpt/1", "step": "9"}
    write_safetensors(tmp_path / "f.safetensors", tensors, meta, fsync=False)
    chunks = host_chunks(tensors, meta)
    assert chunks is not None
    assert b"".join(bytes(memoryview(c).cast("B")) for c in chunks) == (tmp_path / "f.safetensors").read_bytes()
    assert host_chunks({"t": torch.randn(4, 4).t()}, meta) is None  # not contiguous: no early upload


def test_a_saver_killed_while_its_parts_upload_leaves_only_steps_that_verify(tmp_path: Path, bucket: str) -> None:
    """SIGKILL while a save's multipart upload from memory is in flight (a real child saving
    16 MiB steps in a loop, killed once S3 lists an open upload): every step S3 counts
    verifies (there may be none yet), nothing half-sent counts, and a restart restores a step
    that verifies and saves the next one into S3."""
    uri = f"s3://{bucket}/kill"
    numel = 1 << 20  # 4 tensors of 4 MiB: one multipart upload per save
    env = {**os.environ, "SPOTCKPT_S3_URI": uri, "SPOTCKPT_METRICS": "0"}
    proc = subprocess.Popen([sys.executable, str(SAVER), str(tmp_path / "d"), "sync", "--numel", str(numel)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # the first step is committed (and its upload under way)
            if line.strip() == "saved 1":
                break
        assert proc.poll() is None, "the saver exited"
        client = S3Store(uri).client
        seen = False
        for _ in range(10_000):  # almost always open: a save is uploaded while the next is written
            seen = bool(client.list_multipart_uploads(Bucket=bucket, Prefix="kill/").get("Uploads"))
            if seen:
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen, "no multipart upload was ever open while the saver ran"
    with S3Store(uri) as store:
        in_s3 = store.list_steps()  # may be none yet: the saver commits locally first
        assert all(store.verify_step(s) == [] for s in in_s3), in_s3
    state = empty_state(numel=numel)
    with CheckpointManager(tmp_path / "d", uri, metrics=False, install_signal_handlers=False) as mgr:
        got = mgr.restore(state)
        assert got is not None and got >= 1
        assert_state_is_step(state, got, numel=numel)
        mgr.save(got + 1, step_state(got + 1, numel=numel), blocking=True)
        assert mgr.wait(timeout=None)
    with S3Store(uri) as store:
        assert got + 1 in store.list_steps() and store.verify_step(got + 1) == []
