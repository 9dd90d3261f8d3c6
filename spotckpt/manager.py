"""``CheckpointManager``: the public entry point, composing the other modules.

Threads and who calls what:

- the *training thread* (the one that constructs the manager) calls every public method:
  ``restore``, ``save``, ``maybe_save``, ``wait``, ``latest_step``, ``all_steps``, ``close``;
- ``spotckpt-persist`` writes staged saves: safetensors + tree, fsync, commit, local retention,
  then tells the uploader;
- the uploader's threads (``spotckpt-upload``, the watchdog observer) copy committed steps to S3;
- the SIGTERM handler (main thread, between bytecodes) only sets a flag and a deadline.

Errors of background threads are kept and raised, chained, from the next ``save()`` / ``wait()``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import env_bool, env_float, resolve_local_dir, resolve_s3_uri, sagemaker_info
from .errors import ConfigError, SaveError, SpotCkptError, StateError
from .format import FileEntry, Manifest, crc32c_b64, crc32c_update, data_file_names, write_safetensors
from .local import LocalStore, write_file_durably
from .events import (
    DurableLocalEvent,
    DurableS3Event,
    EventBus,
    JsonLinesListener,
    Listener,
    PreemptedEvent,
    ProgressEvent,
    RestoreEvent,
    SaveEvent,
)
from .metrics import MetricsListener, Stats
from .preemption import DEFAULT_GRACE_SECONDS, PreemptionWatcher
from .restore import RestoreResult, restore_newest
from .stage import StagedTensors, Stager
from .torch_state import capture

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)

_VERSION = "0.1.0"


class _Job:
    """One save on its way to disk (persist thread)."""

    __slots__ = ("step", "tree", "staged", "t_start", "done", "error")

    def __init__(self, step: int, tree: dict[str, Any], staged: StagedTensors, t_start: float) -> None:
        self.step = step
        self.tree = tree
        self.staged = staged
        self.t_start = t_start
        self.done = threading.Event()
        self.error: BaseException | None = None


class CheckpointManager:
    """Saves ``state`` atomically under ``local_dir``, syncs to ``s3_uri``, restores the newest
    valid step, and turns SIGTERM into a final durable checkpoint.

    See DESIGN.md, "Public API". Keyword arguments beyond the documented ones:
    ``grace_seconds`` (SIGTERM to SIGKILL, default 120), ``verify_on_restore`` (CRC32C of every
    file before loading, default True), ``allow_pickle`` (store/load values that only pickle can
    represent; off by default, as checkpoints come back from S3), ``install_signal_handlers``,
    ``imds`` (poll the EC2 spot notice; default from ``$SPOTCKPT_IMDS``), ``metrics`` (metric
    lines on stderr; default from ``$SPOTCKPT_METRICS``, on).
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str] | None = None,
        s3_uri: str | None = None,
        *,
        every_steps: int | None = 500,
        every_seconds: float | None = None,
        keep_last: int | None = 3,
        async_save: bool = True,
        grace_seconds: float | None = None,
        verify_on_restore: bool = True,
        allow_pickle: bool = False,
        install_signal_handlers: bool = True,
        imds: bool | None = None,
        metrics: bool | None = None,
        rank: int = 0,
    ) -> None:
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ConfigError(f"every_steps must be a positive int or None, got {every_steps!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise ConfigError(f"every_seconds must be > 0 or None, got {every_seconds!r}")
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ConfigError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
        if rank != 0:
            raise ConfigError("only a single writer (rank 0) is supported in this version")
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self.keep_last = keep_last
        self.async_save = async_save
        self.verify_on_restore = verify_on_restore
        self.allow_pickle = allow_pickle
        self.rank = rank
        grace = grace_seconds if grace_seconds is not None else env_float("SPOTCKPT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)

        self.local = LocalStore(resolve_local_dir(local_dir))
        self.local_dir = self.local.root
        self.s3_uri = resolve_s3_uri(s3_uri)
        sm = sagemaker_info()
        if self.s3_uri is None and sm.checkpoint_sync_active:
            log.info("spotckpt: SageMaker syncs %s to S3 itself; spotckpt uploads nothing", self.local_dir)

        self.stats = Stats()
        self.events = EventBus()
        self.events.subscribe(self.stats)
        self.events.subscribe(MetricsListener(enabled=metrics if metrics is not None else env_bool("SPOTCKPT_METRICS", True)))
        self._events_file: JsonLinesListener | None = None
        events_path = os.environ.get("SPOTCKPT_EVENTS_FILE")
        if events_path:
            try:
                self._events_file = JsonLinesListener(events_path)
            except OSError as exc:
                log.warning("spotckpt: cannot write events to %s (%s)", events_path, exc)
            else:
                self.events.subscribe(self._events_file)
        self._watcher = PreemptionWatcher(grace_seconds=grace)
        if install_signal_handlers:
            self._watcher.install()
        self._stager = Stager()
        self._lock = threading.Lock()
        # Items for the persist thread: a _Job to write, an int = "apply retention, keeping this
        # step" (off the save's critical path), None = stop.
        self._queue: queue.Queue[_Job | int | None] = queue.Queue()
        self._pending: _Job | None = None
        self._bg_error: BaseException | None = None
        self._last_saved_step: int | None = None
        self._last_save_time = time.monotonic()
        self._preempted = False
        self._closed = False

        self._store: Any = None
        self._uploader: Any = None
        self._save_started: dict[int, float] = {}  # step -> perf_counter() at save(), until in S3
        if self.s3_uri is not None:
            self._start_s3()
        self._imds: Any = None
        if imds if imds is not None else env_bool("SPOTCKPT_IMDS", False):
            self._start_imds()

        self._persist_thread = threading.Thread(target=self._persist_loop, name="spotckpt-persist", daemon=True)
        self._persist_thread.start()

    # -- optional components ------------------------------------------------------------
    def _start_s3(self) -> None:
        from .s3 import S3Store
        from .uploader import Uploader

        self._store = S3Store(self.s3_uri)
        self._store.check_access()
        self._uploader = Uploader(self.local_dir, self._store, keep_last=self.keep_last,
                                  on_uploaded=self._on_uploaded)
        self._uploader.start()

    def _on_uploaded(self, step: int, seconds: float, nbytes: int) -> None:
        """Uploader thread: a step's manifest is in S3. ``since_save_s`` runs from ``save()``."""
        with self._lock:
            t0 = self._save_started.get(step)
            for s in [s for s in self._save_started if s <= step]:  # older ones were skipped
                del self._save_started[s]
        since = time.perf_counter() - t0 if t0 is not None else None
        self.events.emit(DurableS3Event(step=step, seconds=seconds, bytes=nbytes, since_save_s=since))

    def _start_imds(self) -> None:
        from .preemption import ImdsPoller  # type: ignore[attr-defined]

        self._imds = ImdsPoller(self._watcher, interval_seconds=env_float("SPOTCKPT_IMDS_INTERVAL_SECONDS", 5.0) or 5.0)
        self._imds.start()

    # -- properties ----------------------------------------------------------------------
    @property
    def preempted(self) -> bool:
        """True once a preemption was noticed and the final checkpoint was saved (and, with S3,
        uploaded or the deadline passed): leave the training loop."""
        return self._preempted

    @property
    def preemption_requested(self) -> bool:
        """True as soon as SIGTERM (or the spot notice) arrived, before the final save."""
        return self._watcher.requested

    @property
    def watcher(self) -> PreemptionWatcher:
        return self._watcher

    # -- restore -------------------------------------------------------------------------
    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None) -> int | None:
        """Load the newest valid step (local, else S3) into ``state`` in place; return it, or
        None when there is no checkpoint yet."""
        self._check_open()
        res: RestoreResult | None = restore_newest(
            state,
            self.local,
            self._store,
            step=step,
            rank=self.rank,
            verify=self.verify_on_restore,
            allow_pickle=self.allow_pickle,
            bounce=_bounce_buffer_for(state),
            progress=_progress_logger(),
        )
        if res is None:
            log.info("spotckpt: no checkpoint in %s%s; starting fresh", self.local_dir,
                     f" or {self.s3_uri}" if self.s3_uri else "")
            return None
        self._last_saved_step = res.step
        self._last_save_time = time.monotonic()
        self.events.emit(RestoreEvent(step=res.step, seconds=res.seconds, source=res.source, bytes=res.bytes))
        return res.step

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, state: MutableMapping[str, Any], *, blocking: bool | None = None) -> None:
        """Checkpoint ``state`` as ``step``. Asynchronous by default (``async_save``): returns
        once the tensors are copied to host memory; ``blocking=True`` returns once the step is
        committed locally. A save while the previous one is persisting waits for it."""
        self._check_open()
        self._raise_bg_error()
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}")
        blocking = (not self.async_save) if blocking is None else blocking
        t0 = time.perf_counter()
        self._wait_pending()
        if step == self._last_saved_step or self.local.step_path(step).is_dir():
            log.info("spotckpt: step %d is already committed; not saving it again", step)
            self._last_saved_step = step
            return
        snap = capture(state, step=step, rank=self.rank, allow_pickle=self.allow_pickle)
        meta = {"format": "spotckpt/1", "step": str(step)}
        if blocking and any(t.device.type != "cpu" for t in snap.tensors.values()):
            # Device tensors: one pinned device-to-host pass into the staging buffer, then one
            # sequential write -- much faster than copying tensor by tensor into pageable memory.
            with self._lock:
                staged = self._stager.stage(snap.tensors, meta)
            try:
                self._persist(step, snap.tree, staged.write_to, t0, snap.nbytes)
            finally:
                with self._lock:
                    self._stager.release(staged)
            stall = time.perf_counter() - t0
        elif blocking:
            # Host tensors: written straight from their memory, no copy at all.
            self._persist(step, snap.tree, lambda p: write_safetensors(p, snap.tensors, meta), t0, snap.nbytes)
            stall = time.perf_counter() - t0
        else:
            with self._lock:
                staged = self._stager.stage(snap.tensors, meta)
                job = _Job(step, snap.tree, staged, t0)
                self._pending = job
            self._queue.put(job)
            stall = time.perf_counter() - t0
        self._last_saved_step = step
        self._last_save_time = time.monotonic()
        if self._uploader is not None:
            with self._lock:
                self._save_started[step] = t0
        self.events.emit(SaveEvent(step=step, stall_s=stall, bytes=snap.nbytes, blocking=blocking))

    def maybe_save(self, step: int, state: MutableMapping[str, Any]) -> bool:
        """Save when the policy says so (``every_steps`` / ``every_seconds``) or when the job is
        being preempted -- then synchronously, flushed (and uploaded within the deadline), and
        ``preempted`` becomes True. Returns whether a save was made."""
        self._check_open()
        if self.events.active:
            self.events.emit(ProgressEvent(step=step))
        if self._preempted:
            return False
        if self._watcher.requested:
            return self._final_save(step, state)
        due = (self.every_steps is not None and step % self.every_steps == 0) or (
            self.every_seconds is not None and time.monotonic() - self._last_save_time >= self.every_seconds
        )
        if not due or step == self._last_saved_step:
            return False
        job = self._pending
        if job is not None and not job.done.is_set():
            self.stats.saves_skipped += 1
            log.info("spotckpt: skipping the policy save of step %d: step %d is still being written", step, job.step)
            return False
        self.save(step, state)
        return True

    def _final_save(self, step: int, state: MutableMapping[str, Any]) -> bool:
        self.events.emit(PreemptedEvent(step=step, reason=self._watcher.reason or "requested"))
        saved = False
        if step != self._last_saved_step:
            self.save(step, state, blocking=True)
            saved = True
        left = self._watcher.seconds_left()
        ok = self.wait(timeout=left)
        if not ok:
            log.warning(
                "spotckpt: the final checkpoint (step %d) is committed locally but did not reach "
                "%s before the deadline", step, self.s3_uri,
            )
        self._preempted = True
        return saved

    # -- persist (persist thread) ---------------------------------------------------------
    def _persist_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if isinstance(item, int):
                    self._prune(item)
                else:
                    self._persist_job(item)
            finally:
                self._queue.task_done()

    def _persist_job(self, job: _Job) -> None:
        try:
            self._persist(job.step, job.tree, job.staged.write_to, job.t_start, job.staged.nbytes)
        except BaseException as exc:  # noqa: BLE001 - surfaced on the next save()/wait()
            job.error = exc
            self._bg_error = exc
            log.error("spotckpt: background save of step %d failed: %s", job.step, exc)
        finally:
            with self._lock:
                self._stager.release(job.staged)
            job.done.set()

    def _prune(self, protect: int) -> None:
        try:
            self.local.prune(self.keep_last, protect=protect)
        except SpotCkptError as exc:
            log.warning("spotckpt: local retention failed: %s", exc)

    def _persist(
        self,
        step: int,
        tree: dict[str, Any],
        write_tensors: Callable[[Path], FileEntry],
        t0: float,
        nbytes: int,
    ) -> None:
        st_name, tree_name = data_file_names(self.rank)
        staging = self.local.begin(step)
        try:
            files = {st_name: write_tensors(staging / st_name)}
            tree_bytes = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("utf-8")
            write_file_durably(staging / tree_name, tree_bytes)
            files[tree_name] = FileEntry(len(tree_bytes), crc32c_b64(crc32c_update(0, tree_bytes)))
            manifest = Manifest(step=step, files=files, extra={"writer": f"spotckpt {_VERSION}", "world_size": 1})
            self.local.commit(staging, manifest)
        except SpotCkptError:
            self.local.abort(staging)
            raise
        except OSError as exc:
            self.local.abort(staging)
            what = "the disk is full" if exc.errno == 28 else (exc.strerror or str(exc))
            raise SaveError(
                f"could not write step {step} to {self.local_dir}: {what}; the partial save was "
                "removed and earlier checkpoints are intact -- free space on the checkpoint "
                "volume or lower keep_last",
                step=step,
            ) from exc
        except (ValueError, TypeError) as exc:
            self.local.abort(staging)
            raise StateError(f"could not serialise step {step}: {exc}") from exc
        except BaseException:
            self.local.abort(staging)
            raise
        self.events.emit(DurableLocalEvent(step=step, seconds=time.perf_counter() - t0, bytes=nbytes))
        if self._uploader is not None:
            self._uploader.notify(step)
        if self.keep_last:
            self._queue.put(step)  # retention runs on the persist thread, after this save

    def _wait_pending(self) -> None:
        job = self._pending
        if job is not None:
            job.done.wait()
            self._raise_bg_error()

    def _raise_bg_error(self) -> None:
        exc = self._bg_error
        if exc is not None:
            self._bg_error = None
            if isinstance(exc, SpotCkptError):
                raise SaveError(f"an earlier background save failed: {exc}", step=getattr(exc, "step", None)) from exc
            raise SaveError(f"an earlier background save failed: {exc!r}") from exc
        if self._uploader is not None:
            self._uploader.raise_if_failed()

    # -- wait / queries --------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the last save is committed locally and, with S3, uploaded. Returns False
        when ``timeout`` (seconds) ran out first. Raises a background error, if any."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self._pending
        if job is not None and not job.done.wait(timeout):
            return False
        if timeout is None:
            self._queue.join()  # retention of the last save has run too
        self._raise_bg_error()
        if self._uploader is not None and self._last_saved_step is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = bool(self._uploader.wait_for(self._last_saved_step, timeout=left))
            self._uploader.raise_if_failed()
            return ok
        return True

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Committed steps, ascending: local, plus S3 when configured."""
        steps = set(self.local.committed_steps())
        if self._store is not None:
            steps |= set(self._store.list_steps())
        return sorted(steps)

    # -- lifecycle -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SpotCkptError("this CheckpointManager is closed; create a new one")

    def close(self, *, timeout: float | None = None) -> None:
        """Finish pending work (local save, upload), stop threads, restore signal handlers."""
        if self._closed:
            return
        self._closed = True
        err: BaseException | None = None
        try:
            job = self._pending
            if job is not None:
                job.done.wait()
        finally:
            self._queue.put(None)
            self._persist_thread.join()
            if self._uploader is not None:
                try:
                    self._uploader.flush(timeout=timeout)
                except SpotCkptError as exc:
                    err = exc
                self._uploader.close()
            if self._store is not None:
                self._store.close()
            if self._imds is not None:
                self._imds.close()
            self._watcher.uninstall()
            self._stager.close()
            if self._events_file is not None:
                self._events_file.close()
        exc = self._bg_error
        self._bg_error = None
        if exc is not None:
            raise SaveError(f"a background save failed: {exc}") from exc
        if err is not None:
            raise err

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            try:
                self.close()
            except SpotCkptError as close_exc:
                log.error("spotckpt: while closing after an error: %s", close_exc)


#: Pinned host memory through which restore feeds CUDA tensors (two alternating halves).
RESTORE_BOUNCE_BYTES = 128 * 1024 * 1024


def _bounce_buffer_for(state: MutableMapping[str, Any]) -> Any:
    """A pinned bounce buffer when CUDA is in use (restoring into device tensors), else None."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.empty(RESTORE_BOUNCE_BYTES, dtype=torch.uint8, pin_memory=True)


def _progress_logger() -> Callable[[int], None]:
    state = {"bytes": 0, "last": time.monotonic()}

    def cb(n: int) -> None:
        state["bytes"] += n
        now = time.monotonic()
        if now - state["last"] > 2.0:
            state["last"] = now
            log.info("spotckpt: downloaded %.1f MiB", state["bytes"] / 2**20)

    return cb

