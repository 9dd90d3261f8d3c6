"""From a captured save to a committed step: the writer, and the persist thread that runs it.

``write_step`` is the one path every save takes to disk (blocking saves call it on the training
thread, async saves on the persist thread): a staging directory, the rank's tensors
(safetensors) and tree (JSON), the manifest, the atomic commit -- and, on any failure, the
staging directory removed and one typed error (``SaveError`` for the disk, ``StateError`` for a
value that cannot be serialised), so the caller sees the same error whichever thread wrote.

The persist thread (``spotckpt-persist``) takes explicit jobs from one queue::

    SaveJob   write a staged save (write_step), release its buffer, then report
    PruneJob  local retention after a save (off that save's critical path)
    StopJob   leave the loop (close)

Threads: the owner (training thread) calls ``submit``, ``join_queue`` and ``stop``; everything
else runs on ``spotckpt-persist``. A job's error is kept on the job and handed to ``on_error``.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SaveError, SpotCkptError, StateError
from .dist import Coordinator
from .format import FileEntry, Manifest, data_file_names, utc_now_iso, write_file_durably
from .local import LocalStore

__all__ = ["write_step", "commit_files", "SaveJob", "PruneJob", "StopJob", "PersistWorker"]

log = logging.getLogger(__name__)


def write_step(
    local: LocalStore,
    step: int,
    tree: dict[str, Any],
    write_tensors: Callable[[Path], FileEntry],
    *,
    rank: int = 0,
    extra: dict[str, Any] | None = None,
    coord: Coordinator | None = None,
) -> Path:
    """Write one rank's files for ``step`` and commit the step; returns the step path.

    One process: a private staging directory, committed at once. Several ranks (``coord``):
    every rank of a host writes into the host's shared staging directory; the file entries of
    every rank are exchanged (rank 0 adds the ``created`` time, so every host writes the same
    global manifest); then each host's leader commits its directory -- the host's files plus the
    manifest listing every rank's -- and a second exchange makes sure every host committed
    before anyone returns. Any rank's failure is raised on every rank, and no host commits."""
    return commit_files(local, step, lambda staging: _write_rank_files(staging, step, tree, write_tensors, rank),
                        extra=extra, coord=coord)


def commit_files(
    local: LocalStore,
    step: int,
    write_files: Callable[[Path], dict[str, FileEntry]],
    *,
    extra: dict[str, Any] | None = None,
    coord: Coordinator | None = None,
) -> Path:
    """Commit ``step`` from the files ``write_files(staging)`` writes into a staging directory
    (returning each one's size and CRC32C): the one commit of :func:`write_step` and of an
    adopted folder (:mod:`spotckpt.adopt`). Returns the step path.

    One process: a private staging directory, committed at once. Several ranks (``coord``):
    every rank of a host writes into the host's shared staging directory (a rank may write
    nothing); the entries of every rank are exchanged (rank 0 adds the ``created`` time, so
    every host writes the same global manifest, which lists each path once: the lowest rank's
    entry wins, and a host whose copy of a path differs from it leaves its copy out); then each
    host's leader commits its directory and a second exchange makes sure every host committed
    before anyone returns. Any rank's failure is raised on every rank, and no host commits."""
    if coord is None:
        staging = local.begin(step)
        try:
            files = write_files(staging)
            return local.commit(staging, Manifest(step=step, files=files, extra=dict(extra or {})))
        except BaseException as exc:
            local.abort(staging)
            err = _translated(exc, step, local)
            if err is exc:
                raise
            raise err from exc
    staging = local.shared_staging(step, owner_pid=coord.leader_pid)
    files: dict[str, FileEntry] = {}
    err: BaseException | None = None
    try:
        files = write_files(staging)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank below
        err = _translated(exc, step, local)
    mine = {"files": {k: [v.size, v.crc32c] for k, v in files.items()},
            "created": utc_now_iso() if coord.rank == 0 else None}
    try:
        recs = coord.exchange(f"write step {step}", mine, error=err, group="persist")
    except BaseException:
        if coord.is_host_leader:
            local.abort(staging)
        raise
    every: dict[str, FileEntry] = {}
    for rec in recs:
        for k, v in rec["files"].items():
            every.setdefault(k, FileEntry(int(v[0]), str(v[1])))
    manifest = Manifest(step=step, files=every, created=recs[0]["created"], extra=dict(extra or {}))
    path = local.step_path(step)
    err = None
    if coord.is_host_leader:
        try:
            assert coord.hosts is not None
            for r in coord.hosts.ranks_of(coord.host):  # this host's copies that lost to a lower rank's
                for k, v in recs[r]["files"].items():
                    if every[k] != FileEntry(int(v[0]), str(v[1])):
                        log.warning("spotckpt: step %d: this host's %s differs from the copy of a lower rank's host; "
                                    "the manifest lists that one and this host leaves its copy out", step, k)
                        (staging / k).unlink(missing_ok=True)
            path = local.commit(staging, manifest)
        except BaseException as exc:  # noqa: BLE001 - reported to every rank below
            err = exc
    coord.exchange(f"commit step {step}", None, error=err, group="persist")
    return path


def _write_rank_files(staging: Path, step: int, tree: dict[str, Any],
                      write_tensors: Callable[[Path], FileEntry], rank: int) -> dict[str, FileEntry]:
    st_name, tree_name = data_file_names(rank)
    files = {st_name: write_tensors(staging / st_name)}
    tree_bytes = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("utf-8")
    files[tree_name] = write_file_durably(staging / tree_name, tree_bytes)
    return files


def _translated(exc: BaseException, step: int, local: LocalStore) -> BaseException:
    """The typed error for a failure while writing: SaveError for the disk (what to do, and
    that earlier checkpoints are intact), StateError for a value that cannot be serialised."""
    if isinstance(exc, SpotCkptError):
        return exc
    if isinstance(exc, OSError):
        what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        err: BaseException = SaveError(
            f"could not write step {step} to {local.root}: {what}; the partial save was "
            "removed and earlier checkpoints are intact -- free space on the checkpoint "
            "volume or lower keep_last",
            step=step,
        )
    elif isinstance(exc, (ValueError, TypeError)):
        err = StateError(f"could not serialise step {step}: {exc}")
    else:
        return exc
    err.__cause__ = exc
    return err


@dataclass(eq=False)
class SaveJob:
    """One async save on its way to disk. ``run`` writes it (persist thread); ``done`` is set
    when it finished, with ``error`` set when it failed."""

    step: int
    run: Callable[[], None]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@dataclass(frozen=True)
class PruneJob:
    """Local retention after the save of ``protect`` (which is never deleted)."""

    protect: int


@dataclass(frozen=True)
class StopJob:
    pass


class PersistWorker:
    """The ``spotckpt-persist`` thread. ``prune(protect)`` runs for each PruneJob;
    ``on_error(job, exc)`` is called (persist thread) when a SaveJob fails."""

    def __init__(self, *, prune: Callable[[int], None], on_error: Callable[[SaveJob, BaseException], None]) -> None:
        self._prune = prune
        self._on_error = on_error
        self._queue: queue.Queue[SaveJob | PruneJob | StopJob] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="spotckpt-persist", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob | PruneJob) -> None:
        self._queue.put(job)

    def join_queue(self) -> None:
        """Wait until every job submitted so far has run."""
        self._queue.join()

    def stop(self) -> None:
        """Run what is queued, then end the thread and join it."""
        if self._thread.is_alive():
            self._queue.put(StopJob())
            self._thread.join()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if isinstance(job, StopJob):
                    return
                if isinstance(job, PruneJob):
                    self._prune(job.protect)
                else:
                    self._run_save(job)
            finally:
                self._queue.task_done()

    def _run_save(self, job: SaveJob) -> None:
        try:
            job.run()
        except BaseException as exc:  # noqa: BLE001 - surfaced on the next save()/wait()
            job.error = exc
            log.error("spotckpt: background save of step %d failed: %s", job.step, exc)
            self._on_error(job, exc)
        finally:
            job.done.set()
