"""Local store: atomic commit, staging placement, retention, stale cleanup, bad directories."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import spotckpt.local as local_mod
from spotckpt.errors import ConfigError, SaveError
from spotckpt.format import FileEntry, Manifest, crc32c_b64, crc32c_update
from spotckpt.local import LocalIO, LocalStore
from spotckpt.policy import KeepAll, KeepLast


def _commit(store: LocalStore, step: int, payload: bytes = b"data") -> Path:
    staging = store.begin(step)
    (staging / "rank-00000.bin").write_bytes(payload)
    m = Manifest(step=step, files={"rank-00000.bin": FileEntry(len(payload), crc32c_b64(crc32c_update(0, payload)))})
    return store.commit(staging, m)


def test_commit_is_atomic_and_staging_is_a_sibling(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    store = LocalStore(root)
    assert store.staging_root.parent == tmp_path and store.staging_root.name.startswith(".")
    staging = store.begin(5)
    (staging / "rank-00000.bin").write_bytes(b"x")
    assert store.committed_steps() == []  # work in progress is invisible under root
    assert os.listdir(root) == []
    store.abort(staging)
    _commit(store, 5)
    assert store.committed_steps() == [5]
    assert sorted(os.listdir(root / "step-000000000005")) == ["manifest.json", "rank-00000.bin"]
    assert store.verify_step(5).ok


def test_committed_step_is_never_replaced(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    _commit(store, 1, b"first")
    # committing the same step again is a no-op, as saving it again is in the manager
    assert _commit(store, 1, b"second") == store.step_path(1)
    assert (store.step_path(1) / "rank-00000.bin").read_bytes() == b"first"
    assert len(list(store.staging_root.iterdir())) == 0


class _CrossDeviceIO(LocalIO):
    """Renames out of the sibling staging dir fail with EXDEV, as across a mount point."""

    def rename(self, src: Path, dst: Path) -> None:
        if Path(src).parent != Path(dst).parent and "/.c.spotckpt-staging" in str(src):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        super().rename(src, dst)


def test_exdev_falls_back_to_hidden_staging(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c", io=_CrossDeviceIO())
    assert store.staging_root == tmp_path / "c" / ".spotckpt-staging"
    _commit(store, 3)
    assert store.committed_steps() == [3]  # the hidden staging dir is not a step


class _FailingRenameIO(LocalIO):
    def rename(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")


def test_a_failed_commit_rename_leaves_nothing_and_says_what_to_do(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    _commit(store, 1, b"first")
    store.io = _FailingRenameIO()
    with pytest.raises(SaveError, match="earlier checkpoints are intact") as ei:
        _commit(store, 2, b"second")
    assert ei.value.step == 2
    assert store.committed_steps() == [1] and store.verify_step(1).ok
    assert list(store.staging_root.iterdir()) == []


def test_retention_keeps_newest_and_uncommits_atomically(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    for s in range(1, 7):
        _commit(store, s)
    # corrupt the newest manifest: the newest *valid* step must survive retention
    (store.step_path(6) / "manifest.json").write_text("{garbage")
    deleted = store.prune(KeepLast(2))
    assert deleted == [1, 2, 3, 4]
    assert store.committed_steps() == [5, 6]
    (store.step_path(6) / "manifest.json").unlink()
    assert store.prune(KeepLast(1)) == []  # 5 is the newest valid one
    assert store.prune(KeepAll()) == []
    assert store.committed_steps() == [5, 6]


def test_stale_staging_is_cleaned_but_live_writers_are_not(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    dead = store.staging_root / "999999999-abc-step-000000000001"
    dead.mkdir()
    live_pid = os.getppid()
    live = store.staging_root / f"{live_pid}-abc-step-000000000002"
    live.mkdir()
    LocalStore(tmp_path / "c")
    assert not dead.exists()
    assert live.exists()


def test_bad_local_dirs_raise_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=str(f)):
        LocalStore(f)
    with pytest.raises(ConfigError, match="cannot create"):
        LocalStore(f / "sub")
    d = tmp_path / "ro"
    d.mkdir()
    real_access = os.access
    monkeypatch.setattr(local_mod.os, "access", lambda p, m: False if Path(p) == d else real_access(p, m))
    with pytest.raises(ConfigError, match="not writable"):
        LocalStore(d)


def test_verify_detects_truncation_and_bit_flips(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    _commit(store, 1, b"abcdefgh")
    p = store.step_path(1) / "rank-00000.bin"
    p.write_bytes(b"abcdefgX")
    assert "CRC32C" in store.verify_step(1).problems[0]
    p.write_bytes(b"abc")
    assert "size" in store.verify_step(1).problems[0]
    p.unlink()
    assert "missing" in store.verify_step(1).problems[0]
