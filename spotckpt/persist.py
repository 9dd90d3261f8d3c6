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
from .format import FileEntry, Manifest, data_file_names, write_file_durably
from .local import LocalStore

__all__ = ["write_step", "SaveJob", "PruneJob", "StopJob", "PersistWorker"]

log = logging.getLogger(__name__)


def write_step(
    local: LocalStore,
    step: int,
    tree: dict[str, Any],
    write_tensors: Callable[[Path], FileEntry],
    *,
    rank: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one rank's files for ``step`` into staging and commit them; returns the step path."""
    st_name, tree_name = data_file_names(rank)
    staging = local.begin(step)
    try:
        files = {st_name: write_tensors(staging / st_name)}
        tree_bytes = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("utf-8")
        files[tree_name] = write_file_durably(staging / tree_name, tree_bytes)
        return local.commit(staging, Manifest(step=step, files=files, extra=dict(extra or {})))
    except SpotCkptError:
        local.abort(staging)
        raise
    except OSError as exc:
        local.abort(staging)
        what = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise SaveError(
            f"could not write step {step} to {local.root}: {what}; the partial save was "
            "removed and earlier checkpoints are intact -- free space on the checkpoint "
            "volume or lower keep_last",
            step=step,
        ) from exc
    except (ValueError, TypeError) as exc:
        local.abort(staging)
        raise StateError(f"could not serialise step {step}: {exc}") from exc
    except BaseException:
        local.abort(staging)
        raise


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
