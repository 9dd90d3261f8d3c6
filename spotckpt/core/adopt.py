"""Adopting checkpoints that other code writes: a folder (a Hugging Face ``checkpoint-N``) or a
single file (a Lightning ``.ckpt``) committed as one step, and the newest such step brought back.

Frameworks write their checkpoints in place, so a save cut short leaves a folder that looks
complete. Adopting one turns it into a step of the ``spotckpt/1`` format::

    scan(src)         list every regular file with its (size, mtime_ns, ctime_ns, inode);
                      refuse symlinks, special files, hidden names, a top-level manifest.json
    adopt_into(...)   copy each file into a staging directory of the LocalStore, CRC32C in the
                      same pass, fsynced (format.copy_file_durably); scan again: any file added,
                      removed, replaced or written meanwhile -> FolderChangedError, nothing
                      committed; else the manifest (``"layout": "folder"``) and the atomic rename

The step directory then holds the files at the same relative paths (and ``manifest.json``), so
the framework loads it as the folder it wrote. spotckpt never opens the files beyond copying
and checksumming them: it never unpickles what it did not write.

The way back is ``CheckpointManager.restore_folder()``: one process, the restore's candidate
walk with the folder layout's loader (:mod:`spotckpt.core.layouts`); several ranks,
:func:`spotckpt.core.adopt_ranks.newest_folder_agreed`. A step saved by ``CheckpointManager.save``
is refused there, as ``restore(state)`` refuses an adopted one.

Limits: the change check compares file metadata, not contents a second time. A writer that
rewrites a file with the same size within the filesystem's timestamp granularity (a few ms)
and keeps its inode is not noticed; frameworks write a checkpoint once and then leave it alone,
which is what the check is for (a save still running, rotation deleting a folder).

Threads: the caller's (the manager's training thread, or its persist thread for an async adopt).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotckpt.errors import CheckpointCorruptError, ConfigError, FolderChangedError, SaveError
from spotckpt.format import MANIFEST_NAME, FileEntry, Manifest, copy_file_durably, fsync_dir, safe_relpath
from spotckpt.core.local import LocalStore

__all__ = ["FolderScan", "scan", "adopt_into", "copy_into", "folder_extra"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stat:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan` saw: ``root`` (the folder, or the file's parent for a single file) and
    every file by its relative path."""

    root: Path
    files: Mapping[str, _Stat]
    single_file: bool

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.files.values())


def scan(src: str | os.PathLike[str]) -> FolderScan:
    """The files of folder (or single file) ``src`` with their metadata; ConfigError for what
    cannot be adopted, with what to do."""
    path = Path(src)
    try:
        st = path.lstat()
    except FileNotFoundError as exc:
        raise ConfigError(f"cannot adopt {path}: it does not exist") from exc
    if stat.S_ISREG(st.st_mode):
        safe = _checked(path.name, path)
        return FolderScan(path.parent, {safe: _stat_of(st)}, True)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"cannot adopt {path}: not a regular file or a directory (a symlink?); pass the real path")
    files = _walk(path)
    if not files:
        raise ConfigError(f"cannot adopt {path}: the folder holds no files; save the checkpoint into it first")
    return FolderScan(path, files, False)


def _walk(root: Path) -> dict[str, _Stat]:
    out: dict[str, _Stat] = {}
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                p = Path(e.path)
                rel = p.relative_to(root).as_posix()
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    _checked(rel, p)
                    stack.append(p)
                elif stat.S_ISREG(st.st_mode):
                    out[_checked(rel, p)] = _stat_of(st)
                else:
                    raise ConfigError(
                        f"cannot adopt {root}: {p} is a symlink or special file; a checkpoint folder "
                        "must hold regular files only (copy the target in instead)"
                    )
    return out


def _checked(rel: str, path: Path) -> str:
    if rel == MANIFEST_NAME:
        raise ConfigError(f"cannot adopt {path}: {MANIFEST_NAME} is spotckpt's commit marker; rename that file")
    try:
        return safe_relpath(rel)
    except CheckpointCorruptError as exc:
        raise ConfigError(
            f"cannot adopt {path}: {rel!r} cannot be stored in a step (unsafe name); remove "
            "or rename it"
        ) from exc


def _stat_of(st: os.stat_result) -> _Stat:
    return _Stat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _rescan(before: FolderScan) -> dict[str, _Stat]:
    if before.single_file:
        (rel,) = before.files
        try:
            return {rel: _stat_of(os.lstat(before.root / rel))}
        except FileNotFoundError:
            return {}
    try:
        return _walk(before.root)
    except (OSError, ConfigError):
        return {}


def _changes(before: Mapping[str, _Stat], after: Mapping[str, _Stat]) -> list[str]:
    out = [f"{rel} appeared" for rel in sorted(set(after) - set(before))]
    out += [f"{rel} disappeared" for rel in sorted(set(before) - set(after))]
    for rel in sorted(set(before) & set(after)):
        b, a = before[rel], after[rel]
        if b.ino != a.ino:
            out.append(f"{rel} was replaced")
        elif b.size != a.size:
            out.append(f"{rel} changed size ({b.size} -> {a.size} bytes)")
        elif (b.mtime_ns, b.ctime_ns) != (a.mtime_ns, a.ctime_ns):
            out.append(f"{rel} was written")
    return out


def adopt_into(
    local: LocalStore,
    step: int,
    before: FolderScan,
    *,
    extra: Mapping[str, Any],
) -> Path:
    """Copy the files of ``before`` into a staging directory (CRC32C in the same pass, fsynced),
    check that nothing changed since ``before`` was taken, and commit the step with
    ``"layout": "folder"`` and ``extra`` in its manifest. Returns the step path.

    FolderChangedError when the source changed (nothing committed); SaveError for the disk.
    A step that is already committed is left as it is (see :meth:`LocalStore.commit`)."""
    staging = local.begin(step)
    try:
        files = copy_into(staging, step, before, local)
        manifest = Manifest(step=step, files=files, extra=dict(extra))
        return local.commit(staging, manifest)
    except BaseException:
        local.abort(staging)
        raise


def copy_into(staging: Path, step: int, before: FolderScan, local: LocalStore) -> dict[str, FileEntry]:
    """Copy the files of ``before`` into ``staging`` (CRC32C in the same pass, fsynced), then
    check that nothing changed since ``before`` was taken; the file entries. FolderChangedError
    when the source changed, SaveError (what to do) for the disk."""
    src = before.root
    try:
        files: dict[str, FileEntry] = {}
        dirs = {staging}
        for rel, st in sorted(before.files.items()):
            out = staging / rel
            if out.parent not in dirs:
                out.parent.mkdir(parents=True, exist_ok=True)
                dirs.update([out.parent, *out.parent.parents])
            try:
                files[rel] = copy_file_durably(src / rel, out)  # looked up here: the tests' seam
            except FileNotFoundError:
                files[rel] = FileEntry(-1, "")  # gone: reported by the rescan below
        problems = _changes(before.files, _rescan(before))
        problems += [f"{rel} was {e.size} bytes when copied, {before.files[rel].size} before"
                     for rel, e in files.items() if e.size != before.files[rel].size and e.size >= 0]
        if problems:
            raise FolderChangedError(
                f"{src} changed while it was being adopted as step {step} ({'; '.join(problems[:5])}); "
                "nothing was committed and earlier steps are intact -- adopt a folder only once the "
                "program that writes it has finished the save (e.g. from the framework's on-save hook)",
                step=step,
            )
        for d in sorted(dirs - {staging}, key=lambda p: len(p.parts), reverse=True):
            if staging in d.parents:
                fsync_dir(d)
        return files
    except OSError as exc:
        what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SaveError(
            f"could not adopt {src} as step {step} into {local.root}: {what}; nothing was "
            "committed and earlier checkpoints are intact -- free space on the checkpoint volume",
            step=step,
        ) from exc


def folder_extra(scan_: FolderScan | None, meta: Mapping[str, Any] | None, *,
                 adopted: str | None = None) -> dict[str, Any]:
    """The adopted step's own manifest extras (beside the commit pipeline's stamp): what was
    adopted (the folder's or file's name: ``adopted``, else from ``scan_``) and the caller's
    JSON ``meta``."""
    if adopted is None:
        assert scan_ is not None
        adopted = scan_.root.name if not scan_.single_file else next(iter(scan_.files))
    extra: dict[str, Any] = {"adopted": adopted}
    if meta:
        try:
            json.dumps(dict(meta), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"meta must be JSON-serialisable, got {meta!r}: {exc}") from exc
        extra["meta"] = dict(meta)
    return extra
