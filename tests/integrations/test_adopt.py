"""CheckpointManager.adopt / restore_folder: folders other code writes, committed as steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import spotckpt.core.adopt
from spotckpt import CheckpointManager, ConfigError, FolderChangedError
from spotckpt.events import DurableLocalEvent, GraceBudgetEvent, RestoreEvent, SaveEvent
from spotckpt.format import copy_file_durably
from spotckpt.remote.s3 import S3Store
from tests.helpers import assert_all_steps_verify, step_state


def _folder(root: Path, seed: int) -> Path:
    """A checkpoint-like folder: a few files, one in a subfolder, contents set by ``seed``."""
    d = root / f"checkpoint-{seed}"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes([seed % 256]) * 5000 + b"m")
    (d / "trainer_state.json").write_text(json.dumps({"global_step": seed}))
    (d / "sub" / "optimizer.pt").write_bytes(bytes(range(256)) * (seed + 1))
    return d


def _same_files(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_adopt_commits_folder_with_events_and_retention_and_restore_folder_returns_it(tmp_path: Path) -> None:
    seen: list[object] = []
    with CheckpointManager(tmp_path / "ckpt", metrics=False, keep_last=2) as mgr:
        mgr.events.subscribe(seen.append)
        for s in (10, 20, 30):
            path = mgr.adopt(s, _folder(tmp_path / "out", s), meta={"framework": "test"})
            assert path == mgr.local.step_path(s)
        mgr.wait()
        assert mgr.all_steps() == [20, 30]  # keep_last governs committed steps
        man = json.loads((path / "manifest.json").read_text())
        assert man["layout"] == "folder" and man["meta"] == {"framework": "test"} and man["step"] == 30
        assert set(man["files"]) == {"model.safetensors", "trainer_state.json", "sub/optimizer.pt"}
        assert mgr.adopt(30, _folder(tmp_path / "again", 31)) == path  # a committed step is never replaced
        _same_files(tmp_path / "out" / "checkpoint-30", path)
        assert mgr.restore_folder() == path
        assert mgr.restore_folder(step=20) == mgr.local.step_path(20)
    kinds = [(type(e).__name__, e.step) for e in seen]  # type: ignore[attr-defined]
    assert ("SaveEvent", 30) in kinds and ("DurableLocalEvent", 30) in kinds and ("RestoreEvent", 30) in kinds
    assert all(isinstance(e, (SaveEvent, DurableLocalEvent, RestoreEvent, GraceBudgetEvent)) for e in seen)
    assert assert_all_steps_verify(tmp_path / "ckpt") == [20, 30]


def test_async_adopt_and_a_single_file(tmp_path: Path) -> None:
    f = tmp_path / "epoch=0-step=7.ckpt"
    f.write_bytes(b"lightning" * 1000)
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        path = mgr.adopt(7, f, blocking=False)
        assert mgr.wait()
        assert (path / f.name).read_bytes() == f.read_bytes()
        assert mgr.restore_folder() == path


@pytest.mark.parametrize("change", ["append", "add", "remove"])
def test_folder_changed_while_adopted_is_refused_and_nothing_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        mgr.adopt(1, _folder(tmp_path / "out", 1))
        src = _folder(tmp_path / "out", 2)
        copied: list[str] = []

        def copy_then_change(a: Path, b: Path):  # type: ignore[no-untyped-def]
            ent = copy_file_durably(a, b)
            copied.append(a.name)
            if len(copied) == 1:  # the framework is still writing while the first file is copied
                if change == "append":
                    with open(src / "model.safetensors", "ab") as fh:
                        fh.write(b"more")
                elif change == "add":
                    (src / "scheduler.pt").write_bytes(b"late")
                else:
                    (src / "trainer_state.json").unlink()
            return ent

        monkeypatch.setattr(spotckpt.core.adopt, "copy_file_durably", copy_then_change)
        with pytest.raises(FolderChangedError, match="changed while it was being adopted as step 2") as ei:
            mgr.adopt(2, src)
        assert ei.value.step == 2 and copied
        assert mgr.all_steps() == [1]
        assert mgr.restore_folder() == mgr.local.step_path(1)  # the last good step is the resume point
    assert not (tmp_path / ".ckpt.spotckpt-staging").exists()  # no staging left behind


def test_what_cannot_be_adopted_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        (tmp_path / "empty").mkdir()
        with pytest.raises(ConfigError, match="holds no files"):
            mgr.adopt(1, tmp_path / "empty")
        with pytest.raises(ConfigError, match="does not exist"):
            mgr.adopt(1, tmp_path / "nope")
        d = _folder(tmp_path / "a", 1)
        (d / "manifest.json").write_text("{}")
        with pytest.raises(ConfigError, match="commit marker"):
            mgr.adopt(1, d)
        d = _folder(tmp_path / "b", 1)
        (d / "link").symlink_to(d / "model.safetensors")
        with pytest.raises(ConfigError, match="symlink"):
            mgr.adopt(1, d)
        d = _folder(tmp_path / "c", 1)
        (d / "a\\b").write_text("x")  # a backslash: not a portable path inside a step
        with pytest.raises(ConfigError, match="unsafe name"):
            mgr.adopt(1, d)
        with pytest.raises(ConfigError, match="JSON"):
            mgr.adopt(1, _folder(tmp_path / "d", 1), meta={"x": object()})
        assert mgr.all_steps() == []


def test_save_and_adopt_layouts_refuse_each_others_restore(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path / "saved", metrics=False) as mgr:
        mgr.save(1, step_state(1, numel=16), blocking=True)
        with pytest.raises(ConfigError, match="restore\\(state\\)"):
            mgr.restore_folder()
    with CheckpointManager(tmp_path / "adopted", metrics=False) as mgr:
        mgr.adopt(1, _folder(tmp_path / "out", 1))
        with pytest.raises(ConfigError, match="restore_folder"):
            mgr.restore({"weights": None})


def test_restore_folder_on_a_fresh_machine_comes_from_s3_verified(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/job"
    with CheckpointManager(tmp_path / "a", uri, metrics=False) as mgr:
        for s in (1, 2):
            mgr.adopt(s, _folder(tmp_path / "out", s))
        assert mgr.wait()
    store = S3Store(uri)
    assert store.list_steps() == [1, 2]
    # step 2's data object is damaged in S3: the fresh machine falls back to step 1
    store.client.put_object(Bucket=bucket, Key="job/step-000000000002/model.safetensors", Body=b"bad")
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False) as mgr:
        path = mgr.restore_folder()
        assert path == mgr.local.step_path(1)
        _same_files(tmp_path / "out" / "checkpoint-1", path)
    assert assert_all_steps_verify(tmp_path / "fresh") == [1]
