"""Local store: atomic commit, staging placement, retention, stale cleanup, bad directories."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from spotckpt.errors import ConfigError, SaveError
from spotckpt.format import FileEntry, Manifest, crc32c_b64, crc32c_update
from spotckpt.core.local import LocalIO, LocalStore
from spotckpt.policy import KeepAll, KeepLast
from tests.helpers import read_only


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
    # a damaged manifest un-commits its step: not counted, and retention keeps the valid ones
    (store.step_path(6) / "manifest.json").write_text("{garbage")
    assert store.committed_steps() == [1, 2, 3, 4, 5]
    assert store.uncommitted_entries() == {6: "damaged"}
    assert store.prune(KeepLast(2)) == [1, 2, 3]
    assert store.committed_steps() == [4, 5]
    assert store.step_path(6).exists()  # never deleted by retention: evidence
    assert store.prune(KeepAll()) == []


def test_retention_never_deletes_while_no_newer_step_is_known_good(tmp_path: Path) -> None:
    first = LocalStore(tmp_path / "c")
    for s in range(1, 5):
        _commit(first, s)
    # a new process: nothing verified yet -- the steps may all be corrupt, so none is deleted
    store = LocalStore(tmp_path / "c")
    assert store.prune(KeepLast(1)) == []
    assert store.committed_steps() == [1, 2, 3, 4]
    store.mark_verified(2)  # e.g. a restore checked step 2: only older steps may go
    assert store.prune(KeepLast(1)) == [1]
    _commit(store, 5)  # committed by this process: verified
    assert store.prune(KeepLast(1)) == [2, 3, 4]


def test_committed_means_a_manifest_that_parses_and_names_the_step(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "c")
    _commit(store, 1)
    store.step_path(2).mkdir()  # no manifest: a partial sync
    (store.step_path(2) / "rank-00000.bin").write_bytes(b"x")
    _commit(store, 3)
    other = store.read_manifest(3).to_bytes()
    (store.step_path(3) / "manifest.json").write_bytes(other.replace(b'"step": 3', b'"step": 4'))
    store.step_path(4).write_text("a file where the directory should be")
    assert store.committed_steps() == [1]
    assert [store.is_committed(s) for s in (1, 2, 3, 4, 5)] == [True, False, False, False, False]
    assert store.uncommitted_entries() == {2: "incomplete", 3: "damaged", 4: "incomplete"}
    # a commit of such a step moves the entry aside (kept as evidence) and commits
    for s in (2, 3, 4):
        path = _commit(store, s, payload=b"new")
        assert store.is_committed(s) and (path / "rank-00000.bin").read_bytes() == b"new"
    assert sorted(p.name.split("-quarantine-")[1] for p in store.staging_root.iterdir()
                  if "-quarantine-" in p.name) == ["step-000000000002", "step-000000000003", "step-000000000004"]
    LocalStore(tmp_path / "c")  # a new process: quarantined entries stay until retention
    assert len([p for p in store.staging_root.iterdir() if "-quarantine-" in p.name]) == 3
    assert store.prune(KeepLast(2)) == [1, 2]
    assert [p.name for p in store.staging_root.iterdir() if "-quarantine-" in p.name] == []  # all older than 4


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


def test_bad_local_dirs_raise_clear_errors(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=str(f)):
        LocalStore(f)
    with pytest.raises(ConfigError, match="cannot create"):
        LocalStore(f / "sub")
    d = tmp_path / "ro"
    d.mkdir()
    with read_only(d):
        with pytest.raises(ConfigError, match="not writable"):
            LocalStore(d)
        assert os.listdir(d) == []  # nothing was created in it


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
