"""The persist thread: async saves and local retention, off the training thread.

What it runs comes from :class:`spotckpt.core.steps.CommitPipeline` (the one path every save takes
to disk); this module only owns the thread and its jobs.

The persist thread (``spotckpt-persist``) takes explicit jobs from one queue::

    SaveJob   write a staged save (write_step), release its buffer, then report
    PruneJob  local retention after a save (off that save's critical path)
    CallJob   a small preparation of the pipeline's (e.g. the staging buffer after a restore);
              its failure is logged, nothing depends on it
    StopJob   leave the loop (close)

Threads: the owner (training thread) calls ``submit``, ``join_queue`` and ``stop``; everything
else runs on ``spotckpt-persist``. A job's error is kept on the job and handed to ``on_error``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


__all__ = ["SaveJob", "PruneJob", "CallJob", "StopJob", "PersistWorker"]

log = logging.getLogger(__name__)


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
class CallJob:
    """Run ``fn()``; an error is logged (``what`` names it) and goes no further."""

    fn: Callable[[], None]
    what: str


@dataclass(frozen=True)
class StopJob:
    pass


class PersistWorker:
    """The ``spotckpt-persist`` thread. ``prune(protect)`` runs for each PruneJob;
    ``on_error(job, exc)`` is called (persist thread) when a SaveJob fails."""

    def __init__(self, *, prune: Callable[[int], None], on_error: Callable[[SaveJob, BaseException], None]) -> None:
        self._prune = prune
        self._on_error = on_error
        self._queue: queue.Queue[SaveJob | PruneJob | CallJob | StopJob] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="spotckpt-persist", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob | PruneJob | CallJob) -> None:
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
                elif isinstance(job, CallJob):
                    try:
                        job.fn()
                    except Exception as exc:  # noqa: BLE001 - a preparation; the save does it itself
                        log.warning("spotckpt: %s failed: %s", job.what, exc)
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
