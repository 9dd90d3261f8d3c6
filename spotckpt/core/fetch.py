"""Fetch a step from S3 into memory, verified as it lands, for a restore that loads it at once.

A restore from S3 into a state does not need the step on disk before it loads: each file is
read with ranged GETs (:data:`PIECE_BYTES` each, as the ranged DCP loads; :data:`THREADS` at a
time) straight into an anonymous in-memory file (``memfd_create``), and each piece is CRC32C'd
as soon as it has landed; the pieces' CRCs are combined and compared with the manifest before
anything is loaded, so a restore stays all or nothing. The load then reads the memory files like a step directory
(:attr:`FetchedStep.dir`, links to them beside a copy of the manifest), through the same mapped
reads as a local step. The local copy -- staging, fsync, commit by rename, the guarantees of a
download -- is made from memory afterwards (:meth:`FetchedStep.download_step` is a source for
``LocalStore.import_step``), on the persist thread: training resumes when the state is loaded,
not when the disk has the copy; the step is durable in S3 all along.

Used (by :func:`spotckpt.core.restore.restore_newest`, through :func:`load_from_memory`) for one
process loading into a state, on Linux, when the step's files fit in :func:`memory_budget`;
otherwise (another loader, several ranks, a step too large for memory) the step is downloaded
into staging and committed first, as before.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotckpt.errors import CheckpointCorruptError, StorageError
from spotckpt.format import (MANIFEST_NAME, Manifest, crc32c_b64, crc32c_combine, crc32c_update, safe_relpath,
                             write_chunks_durably)
from spotckpt.ranks.shard import FETCH_PIECE_BYTES as PIECE_BYTES
from spotckpt.ranks.shard import run_all

if TYPE_CHECKING:
    from spotckpt.core.local import LocalStore

__all__ = ["FetchedStep", "fetch_to_memory", "load_from_memory", "memory_budget", "PIECE_BYTES", "THREADS"]

log = logging.getLogger(__name__)

#: Ranged GETs in flight. On the 2-core VM against SeaweedFS, 1 GiB: 8 x 16 MiB took 0.93 s,
#: 16 x 8 MiB 1.00 s, 4 x 32 MiB 1.13 s, boto3's ``download_file`` to a file 1.94 s.
THREADS = 8


def memory_budget() -> int:
    """How many bytes a restore may hold in memory: half of ``MemAvailable`` (0 where
    ``/proc/meminfo`` or ``memfd_create`` is missing: not Linux, so no memory fetch)."""
    if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        return 0
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    return 0


#: Steps held in memory now. A process forked while one is held (a DataLoader worker started
#: right after the restore) would keep its memory alive for as long as it runs: the child drops
#: its inherited handles at once (:func:`_drop_in_child`).
_LIVE: weakref.WeakSet[FetchedStep] = weakref.WeakSet()


def _drop_in_child() -> None:
    for f in list(_LIVE):
        try:
            f._release()
        except (OSError, BufferError):  # pragma: no cover - nothing in the child uses them
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


class FetchedStep:
    """A step held in memory: one verified memory file per data file of ``manifest``.
    ``dir`` reads like the step's directory (it must be a fresh, empty directory of the
    caller's, e.g. a staging directory; :meth:`close` empties it, the caller removes it).
    :meth:`download_step` makes the local copy. Close once done with both."""

    def __init__(self, uri: str, manifest: Manifest, dir: Path) -> None:
        self.uri = uri
        self.manifest = manifest
        self.dir = Path(dir)
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        _LIVE.add(self)

    def _open(self, rel: str, size: int) -> memoryview:
        fd = os.memfd_create(f"spotckpt-step-{self.manifest.step}", os.MFD_CLOEXEC)
        self._fds[rel] = fd
        if size:
            os.ftruncate(fd, size)
            self._maps[rel] = mmap.mmap(fd, size)
        link = self.dir / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f"/proc/{os.getpid()}/fd/{fd}", link)
        return memoryview(self._maps[rel]) if size else memoryview(b"")

    def read_manifest(self, step: int) -> Manifest:
        return self.manifest

    def download_step(self, step: int, dest_dir: Path, manifest: Manifest | None = None, *,
                      progress: Callable[[int], None] | None = None) -> Manifest:
        """Write every file from memory into ``dest_dir`` (a staging directory), checksummed
        in the same pass and fsynced (the source contract of ``LocalStore.import_step``)."""
        m = manifest if manifest is not None else self.manifest
        for rel, ent in m.files.items():
            out = Path(dest_dir) / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            mm = self._maps.get(rel)
            try:
                with memoryview(mm if mm is not None else b"") as view:
                    got = write_chunks_durably(out, (view,), stable=True)
            except OSError as exc:
                what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                raise StorageError(f"writing the restored {rel} to {out} failed: {what}; nothing was committed "
                                   "locally (the step stays in S3) -- free space there", key=str(out)) from exc
            if got != ent:  # memory changed under us: never commit it
                raise CheckpointCorruptError(f"{self.uri}: {rel} changed in memory after it verified "
                                             f"({got.crc32c} != {ent.crc32c})", path=str(out))
            if progress is not None:
                progress(ent.size)
        return m

    def close(self) -> None:
        """Free the memory and remove the links (idempotent)."""
        names = list(self._fds)
        self._release()
        for rel in names:
            (self.dir / rel).unlink(missing_ok=True)
        (self.dir / MANIFEST_NAME).unlink(missing_ok=True)

    def _release(self) -> None:
        """Unmap and close this process's handles on the memory (not the links)."""
        _LIVE.discard(self)
        for mm in self._maps.values():
            mm.close()
        for fd in self._fds.values():
            os.close(fd)
        self._maps.clear()
        self._fds.clear()


def load_from_memory(local: LocalStore, remote: Any, s: int, load: Callable[[Path, Manifest], None], *,
                     replace: bool, progress: Callable[[int], None] | None = None,
                     ) -> tuple[Path, Manifest, Callable[[], None]] | None:
    """Fetch step ``s`` of ``remote`` into memory, verified, and ``load(dir, manifest)`` it.
    Returns the directory it was loaded from, the manifest and ``keep_local``: the local copy
    still to make from memory (committed into ``local``, replacing a corrupt local copy of
    ``s`` when ``replace``), to run off the training thread; it raises what a failed download
    would (the step stays in S3). None when the step does not fit :func:`memory_budget`
    (nothing was read). A local disk without room for the step fails here, as a download would,
    not at the first save."""
    manifest = remote.read_manifest(s)
    if manifest.total_bytes > memory_budget():
        return None
    links = local.begin(s)  # a staging directory: removed by the next start if this process dies
    try:
        free = shutil.disk_usage(links).free
        if free < manifest.total_bytes:
            raise StorageError(
                f"No space left for step {s} under {local.root}: it needs {manifest.total_bytes} bytes, "
                f"{free} are free; nothing was loaded or committed -- free space there (or set local_dir "
                "to a larger volume)", key=str(local.root))
        fetched = fetch_to_memory(remote, s, links, manifest, progress=progress)
    except BaseException:
        local.abort(links)
        raise
    try:
        load(links, manifest)
    except BaseException:
        fetched.close()
        local.abort(links)
        raise

    def keep_local() -> None:
        try:
            local.import_step(fetched, s, replace=replace)
            local.mark_verified(s)
        finally:
            fetched.close()
            local.abort(links)

    return links, manifest, keep_local


def fetch_to_memory(remote: Any, step: int, dir: Path, m: Manifest, *,
                    progress: Callable[[int], None] | None = None) -> FetchedStep:
    """Read every file of ``m`` (``step``'s manifest, which the caller found fits
    :func:`memory_budget`) from ``remote`` (a RemoteStore: ``read_range_into``) into memory,
    each piece checksummed as it lands, and verify every file against ``m``.
    CheckpointCorruptError when a file is short or does not verify (nothing is kept), a
    StorageError when S3 fails."""
    for rel in m.files:
        safe_relpath(rel, source=f"{remote.uri} step {step}")
    got = FetchedStep(remote.uri, m, dir)
    try:
        try:
            _fill(remote, step, got, progress)
            (Path(dir) / MANIFEST_NAME).write_bytes(m.to_bytes())  # what a step directory has (the autopilot reads it)
        except OSError as exc:  # memory files, mappings, links, the manifest's copy
            raise StorageError(f"cannot hold step {step} in memory under {dir}: {exc.strerror or exc}; nothing was "
                               "loaded -- free memory or space on the checkpoint volume", key=str(dir)) from exc
    except BaseException:
        got.close()
        raise
    log.info("step %s fetched from %s into memory (%d bytes, verified)", step, remote.uri, m.total_bytes)
    return got


def _fill(remote: Any, step: int, got: FetchedStep, progress: Callable[[int], None] | None) -> None:
    """Read ``got``'s files in pieces, :data:`THREADS` at a time, and check each file's CRC32C."""
    m = got.manifest
    views = {rel: got._open(rel, ent.size) for rel, ent in sorted(m.files.items())}
    pieces = [(rel, off, min(PIECE_BYTES, m.files[rel].size - off))
              for rel in views for off in range(0, m.files[rel].size, PIECE_BYTES)]

    def fetch(rel: str, off: int, n: int) -> int:
        with views[rel][off : off + n] as out:
            remote.read_range_into(step, rel, off, out)
            crc = crc32c_update(0, out)  # while the piece is still in cache
        if progress is not None:
            progress(n)
        return crc

    try:
        crcs = run_all(fetch, pieces, THREADS)
    finally:
        for v in views.values():
            v.release()  # the mappings can be closed
    whole: dict[str, int] = {}
    for (rel, _, n), crc in zip(pieces, crcs):
        whole[rel] = crc32c_combine(whole[rel], crc, n) if rel in whole else crc
    for rel, ent in m.files.items():
        have = crc32c_b64(whole.get(rel, 0))
        if have != ent.crc32c:
            raise CheckpointCorruptError(
                f"{remote.uri}: {rel} of step {step} has CRC32C {have}, the manifest says {ent.crc32c}; the "
                "object is corrupt -- an older step will be used", path=f"{remote.uri} {rel}")
