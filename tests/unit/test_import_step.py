"""Importing a verified step into a local directory (``spotckpt restore``, restore from S3): a
copy that fails midway or a source that does not verify leaves the destination as it was."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from spotckpt.tools.cli import main
from spotckpt.errors import CheckpointCorruptError, StorageError
from spotckpt.format import Manifest
from spotckpt.core.local import LocalStore
from tests.helpers import assert_all_steps_verify, write_step


class _FailsMidway(LocalStore):
    """A source whose copy writes the first file into staging, then fails (a disk error)."""

    def download_step(self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
                      progress: Callable[[int], None] | None = None) -> Manifest:
        m = self.read_manifest(step)
        first = next(iter(m.files))
        (dest_dir / first).write_bytes((self.step_path(step) / first).read_bytes()[:100])
        raise StorageError("copy failed midway (injected)", key=first)


def _dest_with_one_step(tmp_path: Path) -> LocalStore:
    dest = LocalStore(tmp_path / "dest")
    write_step(dest.root, 1, nbytes=4096)
    return dest


def test_a_copy_failing_midway_commits_nothing_and_leaks_no_staging(tmp_path: Path) -> None:
    write_step(tmp_path / "src", 7, nbytes=64 * 1024, nfiles=2)
    dest = _dest_with_one_step(tmp_path)
    src = _FailsMidway(tmp_path / "src", create=False, cleanup=False)
    with pytest.raises(StorageError, match="midway"):
        dest.import_step(src, 7)
    assert assert_all_steps_verify(dest.root) == [1]
    assert list(dest.staging_root.iterdir()) == []
    assert (src.step_path(7) / "manifest.json").is_file()  # the source is never touched


def test_a_source_that_does_not_verify_is_refused(tmp_path: Path) -> None:
    write_step(tmp_path / "src", 7, nbytes=64 * 1024)
    f = tmp_path / "src" / "step-000000000007" / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    dest = _dest_with_one_step(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="rank-00000.safetensors"):
        dest.import_step(LocalStore(tmp_path / "src", create=False, cleanup=False), 7)
    assert assert_all_steps_verify(dest.root) == [1]
    assert list(dest.staging_root.iterdir()) == []


def test_imported_step_is_committed_and_verifies(tmp_path: Path) -> None:
    man = write_step(tmp_path / "src", 7, nbytes=64 * 1024, nfiles=2)
    dest = _dest_with_one_step(tmp_path)
    seen: list[int] = []
    path, m = dest.import_step(LocalStore(tmp_path / "src", create=False, cleanup=False), 7, progress=seen.append)
    assert path == dest.step_path(7) and m.files == man.files
    assert sum(seen) == man.total_bytes
    assert assert_all_steps_verify(dest.root) == [1, 7]


def test_cli_restore_falls_back_past_a_truncated_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_step(src, 5, nbytes=32 * 1024)
    write_step(src, 9, nbytes=32 * 1024)
    f = src / "step-000000000009" / "rank-00000.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # truncated: the copy fails its check after writing
    dest = tmp_path / "dest"
    assert main(["restore", str(src), "--to", str(dest)]) == 0
    assert "step 9:" in capsys.readouterr().err
    assert assert_all_steps_verify(dest) == [5]
    assert list(LocalStore(dest).staging_root.iterdir()) == []
    assert main(["restore", str(src), "--to", str(dest), "--step", "9"]) == 1


def test_disk_errors_while_copying_are_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spotckpt.core.local as local_mod

    write_step(tmp_path / "src", 3, nbytes=64 * 1024)
    dest = _dest_with_one_step(tmp_path)

    def full(*a: object, **k: object) -> tuple[int, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_mod, "copy_file_durably", full)
    with pytest.raises(StorageError, match="disk is full"):
        dest.import_step(LocalStore(tmp_path / "src", create=False, cleanup=False), 3)
    assert assert_all_steps_verify(dest.root) == [1]
    assert list(dest.staging_root.iterdir()) == []
