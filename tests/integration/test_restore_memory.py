"""A restore from S3 into a state fetches the step into memory, verified piece by piece, loads
it, and commits the local copy afterwards on the persist thread (spotckpt.core.fetch)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import boto3
import pytest
import torch

from spotckpt import CheckpointManager
from spotckpt.core import fetch as fetch_mod
from spotckpt.core.fetch import FetchedStep, fetch_to_memory
from spotckpt.core.local import LocalStore
from spotckpt.errors import CheckpointCorruptError, StateError, StorageError
from spotckpt.format import step_dirname
from spotckpt.remote.memory import MemoryStore
from tests.helpers import assert_state_is_step, empty_state, step_state

S3_SERVERS = ("moto", "seaweedfs")
NUMEL = 1 << 16


def _save(root: Path, uri: str, steps: tuple[int, ...]) -> None:
    with CheckpointManager(root, uri, keep_last=None, metrics=False, install_signal_handlers=False) as mgr:
        for s in steps:
            mgr.save(s, step_state(s, numel=NUMEL), blocking=True)
        assert mgr.wait()


def _staging_left(mgr: CheckpointManager) -> list[str]:
    return sorted(p.name for p in mgr.local.staging_root.iterdir()) if mgr.local.staging_root.exists() else []


def test_restore_from_s3_loads_from_memory_then_commits_locally(tmp_path: Path, bucket: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    uri = f"s3://{bucket}/mem"
    _save(tmp_path / "a", uri, (1, 2))
    target = empty_state(numel=NUMEL)
    caplog.set_level(logging.INFO, logger="spotckpt")
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(target) == 2
        assert_state_is_step(target, 2, numel=NUMEL)
        assert any("fetched from" in r.getMessage() and "into memory" in r.getMessage() for r in caplog.records)
        assert mgr.wait()  # the local copy is made off the training thread; wait() sees it done
        assert mgr.local.committed_steps() == [2]
        assert mgr.local.verify_step(2).ok
        assert _staging_left(mgr) == []  # the links to the memory files are gone
        mgr.save(3, step_state(3, numel=NUMEL), blocking=True)  # the run goes on
    again = empty_state(numel=NUMEL)
    with CheckpointManager(tmp_path / "fresh", None, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(again, step=2) == 2  # the local copy, read back from disk
    assert_state_is_step(again, 2, numel=NUMEL)


def test_a_corrupt_object_in_s3_falls_back_with_the_state_untouched(tmp_path: Path, bucket: str, s3_env: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    uri = f"s3://{bucket}/bad"
    _save(tmp_path / "a", uri, (1, 2))
    s3 = boto3.client("s3", endpoint_url=s3_env)
    key = f"bad/{step_dirname(2)}/rank-00000.safetensors"
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-5] ^= 0xFF  # same size, one byte flipped: only the CRC32C can tell
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    target = empty_state(numel=NUMEL)
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(target) == 1
        assert mgr.wait()
        assert mgr.local.committed_steps() == [1]
        assert _staging_left(mgr) == []
    assert_state_is_step(target, 1, numel=NUMEL)
    assert any("skipping S3 step 2" in r.getMessage() and "CRC32C" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)
def test_a_step_larger_than_the_memory_budget_is_downloaded_first(tmp_path: Path, bucket: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{bucket}/big"
    _save(tmp_path / "a", uri, (1,))
    monkeypatch.setattr(fetch_mod, "memory_budget", lambda: 1024)
    target = empty_state(numel=NUMEL)
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(target) == 1
        assert mgr.local.committed_steps() == [1]  # committed before the load, as a download is
    assert_state_is_step(target, 1, numel=NUMEL)


def test_a_failed_local_copy_is_a_warning_and_the_step_stays_in_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore("keep")
    with CheckpointManager(tmp_path / "a", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        mgr.save(5, step_state(5, numel=NUMEL), blocking=True)
        assert mgr.wait()

    def full(self: FetchedStep, step: int, dest_dir: Path, *a: object, **k: object) -> None:
        raise StorageError(f"writing the restored files to {dest_dir} failed: the disk is full", key=str(dest_dir))

    monkeypatch.setattr(FetchedStep, "download_step", full)
    target = empty_state(numel=NUMEL)
    with CheckpointManager(tmp_path / "fresh", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore(target) == 5
        assert mgr.wait()
        assert mgr.local.committed_steps() == [] and _staging_left(mgr) == []
    assert_state_is_step(target, 5, numel=NUMEL)
    assert store.list_steps() == [5]
    assert any("keeping the restored step 5 locally failed" in r.getMessage() and "disk is full" in r.getMessage()
               for r in caplog.records)


def _memory_step(tmp_path: Path, numel: int = NUMEL) -> tuple[MemoryStore, LocalStore]:
    store = MemoryStore("unit")
    with CheckpointManager(tmp_path / "src", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        mgr.save(7, step_state(7, numel=numel), blocking=True)
        assert mgr.wait()
    return store, LocalStore(tmp_path / "dst")


def test_fetch_reads_pieces_in_parallel_and_the_copy_commits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_mod, "PIECE_BYTES", 4096)  # many pieces per file, combined CRC32C
    store, local = _memory_step(tmp_path)
    links = local.begin(7)
    got: list[int] = []
    fetched = fetch_to_memory(store, 7, links, store.read_manifest(7), progress=got.append)
    assert sum(got) == fetched.manifest.total_bytes and len(got) > 8
    assert all(os.path.islink(links / rel) for rel in fetched.manifest.files)
    path, manifest = local.import_step(fetched, 7)
    fetched.close()
    assert manifest == fetched.manifest and local.verify_step(7).ok
    assert sorted(p.name for p in links.iterdir()) == []  # close() took the links and the manifest copy


@pytest.mark.parametrize("damage", ["flip", "short"])
def test_fetch_refuses_a_damaged_file_and_keeps_nothing(tmp_path: Path, damage: str) -> None:
    store, local = _memory_step(tmp_path)
    key = f"{step_dirname(7)}/rank-00000.safetensors"
    data = bytearray(store._objects[key])
    if damage == "flip":
        data[100] ^= 1
    else:
        del data[-10:]
    store._objects[key] = bytes(data)
    links = local.begin(7)
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(CheckpointCorruptError, match="rank-00000.safetensors") as info:
        fetch_to_memory(store, 7, links, store.read_manifest(7))
    assert ("older step will be used" if damage == "flip" else "damaged") in str(info.value)
    assert list(links.iterdir()) == []
    assert set(os.listdir("/proc/self/fd")) <= fds_before | {str(max(map(int, fds_before)) + 1)}


def test_a_restore_from_memory_into_a_live_model_is_all_or_nothing(tmp_path: Path) -> None:
    """A model built with another shape: StateError, nothing lands, the memory and links go."""
    store = MemoryStore("shape")
    with CheckpointManager(tmp_path / "src", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        mgr.save(3, {"t": torch.arange(8.0), "m": torch.nn.Linear(4, 4)}, blocking=True)
        assert mgr.wait()
    live = {"t": torch.zeros(8), "m": torch.nn.Linear(4, 5)}
    before = {k: v.clone() for k, v in live["m"].state_dict().items()}
    with CheckpointManager(tmp_path / "fresh", remote_store=store, metrics=False, install_signal_handlers=False) as mgr:
        with pytest.raises(StateError, match="shapes differ"):
            mgr.restore(live)
        assert _staging_left(mgr) == [] and mgr.local.committed_steps() == []
    assert torch.equal(live["t"], torch.zeros(8))
    assert all(torch.equal(before[k], v) for k, v in live["m"].state_dict().items())


def test_a_process_forked_while_a_step_is_in_memory_does_not_keep_it(tmp_path: Path) -> None:
    """A DataLoader worker forked right after a restore from memory drops the inherited memory
    files at once (else they would live as long as the worker)."""
    store, local = _memory_step(tmp_path)
    fetched = fetch_to_memory(store, 7, local.begin(7), store.read_manifest(7))

    def memfds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                out.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [t for t in out if "spotckpt-step-7" in t]

    assert memfds()  # the parent holds them
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        os._exit(10 + len(memfds()))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 10  # none inherited
    assert memfds()  # the parent still holds them
    fetched.close()
    assert not memfds()
