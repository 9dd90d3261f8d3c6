"""Uploader: watchdog hints + reconcile scan against a real S3 endpoint (moto on 127.0.0.1)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

from spotckpt.errors import StorageError
from spotckpt.format import MANIFEST_NAME, Manifest, step_dirname
from spotckpt.remote.s3 import S3Store
from spotckpt.policy import KeepLast
from spotckpt.remote.uploader import Uploader
from tests.helpers import write_step

# Every S3 test here runs against moto and a real server (SeaweedFS); see tests/conftest.py.
S3_SERVERS = ("moto", "seaweedfs")

MiB = 1024 * 1024


def make_step(root: Path, step: int, nbytes: int = 32 * 1024, *, seed: int = 0) -> Manifest:
    return write_step(root, step, nbytes, seed=seed)


def verify_s3(store: S3Store, tmp: Path) -> list[int]:
    """Every committed S3 step downloads and verifies (sizes + CRC32C); returns the steps."""
    steps = store.list_steps()
    for s in steps:
        store.download_step(s, tmp / f"verify-{s}")
    return steps


def test_watchdog_uploads_new_steps_and_applies_retention(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    store = S3Store(f"s3://{bucket}/run")
    # long scan interval: the watchdog event is what wakes the uploader here
    up = Uploader(local, store, retention=KeepLast(2), scan_interval_seconds=3600)
    up.start()
    try:
        for step in (10, 20, 30):
            make_step(local, step)
            assert up.wait_for(step, timeout=60)
        assert up.flush(timeout=60)
        assert store.list_steps() == [20, 30]
        assert up.uploaded_steps() == [20, 30]
        assert up.error is None
    finally:
        up.close(timeout=30)
    assert verify_s3(store, tmp_path) == [20, 30]
    assert not [t for t in threading.enumerate() if t.name.startswith("spotckpt-uploader")]


def test_scan_finds_steps_without_events_newest_first_and_skips_doomed(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    for step in (1, 2, 3, 4, 5):
        make_step(local, step)
    store = S3Store(f"s3://{bucket}/run")
    order: list[str] = []

    def record(params: dict, **_: object) -> None:
        if params["Key"].endswith(MANIFEST_NAME):
            order.append(params["Key"].split("/")[1])

    store.client.meta.events.register("before-parameter-build.s3.PutObject", record)
    up = Uploader(local, store, retention=KeepLast(2), scan_interval_seconds=0.2)
    up.sync_once()  # no threads, no events: the scan alone
    assert order == [step_dirname(5), step_dirname(4)]  # newest first; 1-3 never uploaded
    assert store.list_steps() == [4, 5]
    up.start()
    try:
        assert up.wait_for(2, timeout=30)  # skipped: retention would delete it anyway
        assert up.flush(timeout=30)
    finally:
        up.close(timeout=30)
    assert order == [step_dirname(5), step_dirname(4)]  # nothing re-uploaded


def test_restarted_uploader_continues_without_reuploading(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    store = S3Store(f"s3://{bucket}/run")
    make_step(local, 1)
    Uploader(local, store).sync_once()
    puts: list[str] = []
    store2 = S3Store(f"s3://{bucket}/run")
    store2.client.meta.events.register("before-parameter-build.s3.*", lambda params, **kw: puts.append(kw["model"].name))
    make_step(local, 2)
    Uploader(local, store2).sync_once()
    assert store2.list_steps() == [1, 2]
    assert "PutObject" in puts and puts.count("PutObject") == 3  # step 2's two data files + manifest only


def test_step_vanishing_mid_upload_is_quiet(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    make_step(local, 1)
    make_step(local, 2)
    store = S3Store(f"s3://{bucket}/run")

    def vanish(params: dict, **_: object) -> None:
        if params["Key"].endswith("step-000000000002/rank-00000.safetensors"):
            shutil.rmtree(local / step_dirname(2))  # local retention / operator removed it

    store.client.meta.events.register("before-parameter-build.s3.PutObject", vanish)
    up = Uploader(local, store)
    up.sync_once()  # no error raised
    assert up.error is None
    assert store.list_steps() == [1]
    # no leftover data objects of the vanished step
    assert not store.client.list_objects_v2(Bucket=bucket, Prefix="run/step-000000000002/").get("Contents")


def test_background_error_surfaces(bucket: str, tmp_path: Path) -> None:
    local = tmp_path / "ckpt"
    make_step(local, 1)
    store = S3Store(f"s3://{bucket}/run", retry_attempts=1)
    store.client.delete_bucket(Bucket=bucket)
    up = Uploader(local, store, scan_interval_seconds=0.2)
    up.start()
    try:
        with pytest.raises(StorageError, match="does not exist") as ei:
            up.wait_for(1, timeout=60)
        assert isinstance(ei.value.__cause__, StorageError)
        with pytest.raises(StorageError):
            up.raise_if_failed()
    finally:
        up.close(timeout=30)


def test_manager_uploads_and_restores_on_an_empty_machine(bucket: str, tmp_path: Path) -> None:
    """End to end through the public API: save -> wait (in S3) -> fresh local dir -> restore."""
    from spotckpt.manager import CheckpointManager

    model = torch.nn.Linear(64, 32)
    uri = f"s3://{bucket}/e2e"
    with CheckpointManager(local_dir=tmp_path / "a", s3_uri=uri, keep_last=2, async_save=True) as mgr:
        for step in (1, 2, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            mgr.save(step, {"model": model, "epoch": step})
            assert mgr.wait()
    assert S3Store(uri).list_steps() == [2, 3]
    fresh = torch.nn.Linear(64, 32)
    state = {"model": fresh, "epoch": 0}
    with CheckpointManager(local_dir=tmp_path / "b", s3_uri=uri, keep_last=2) as mgr2:
        assert mgr2.restore(state) == 3
    assert state["epoch"] == 3
    assert torch.equal(fresh.weight, model.weight)


def test_damaged_local_step_is_not_uploaded_and_does_not_block_others(bucket: str, tmp_path: Path) -> None:
    from spotckpt.errors import CheckpointCorruptError

    local = tmp_path / "ckpt"
    make_step(local, 1)
    make_step(local, 2)
    with open(local / step_dirname(2) / "rank-00000.safetensors", "ab") as f:
        f.write(b"junk")  # size no longer matches the manifest
    store = S3Store(f"s3://{bucket}/run")
    up = Uploader(local, store)
    up.sync_once()
    assert store.list_steps() == [1]
    up.start()
    try:
        with pytest.raises(CheckpointCorruptError):
            up.wait_for(2, timeout=30)
    finally:
        up.close(timeout=30)
