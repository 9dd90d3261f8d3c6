"""``CheckpointManager``: the public entry point, composing the other modules.

Threads and who calls what:

- the *training thread* (the one that constructs the manager) calls every public method:
  ``restore``, ``save``, ``maybe_save``, ``wait``, ``latest_step``, ``all_steps``, ``close``;
- ``spotckpt-persist`` (:mod:`spotckpt.core.persist`) writes async saves: safetensors + tree, fsync,
  commit, then tells the uploader; local retention runs there too, after each save;
- the uploader's threads (``spotckpt-uploader``, and ``spotckpt-uploader-watch``, the watchdog
  observer) copy committed steps to S3;
- listeners of ``mgr.events`` run on the thread that emits (see :mod:`spotckpt.events`);
- the SIGTERM handler (main thread, between bytecodes) only sets a flag and a deadline.

Errors of background threads are kept and raised, chained, from the next ``save()`` / ``wait()``.
"""

from __future__ import annotations

import atexit
import logging
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable, Collection, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any

from spotckpt.autopilot import Autopilot
from spotckpt.core.adopt_ranks import adopt_folder, restore_folder
from spotckpt.core.config import env_bool, env_float, resolve_local_dir, resolve_s3_uri, sagemaker_info
from spotckpt.core.early_upload import enabled as upload_while_writing_enabled
from spotckpt.ranks.dist import Coordinator, RequestChannel, SaveAgreement, coordinator_from_torch
from spotckpt.errors import (
    ClosedError,
    CollectiveError,
    ConfigError,
    SaveError,
    SpotCkptError,
    StateError,
    StorageError,
)
from spotckpt.core.layouts import FOLDER
from spotckpt.events import (
    EventBus,
    JsonLinesListener,
    PreemptedEvent,
    ProgressEvent,
)
from spotckpt.core.local import LocalStore
from spotckpt.core.metrics import MetricsListener, Stats, progress_logger
from spotckpt.policy import RetentionPolicy, SavePolicy, retention_from
from spotckpt.core.preemption import DEFAULT_GRACE_SECONDS, PreemptionWatcher
from spotckpt.core.restore import RestoreOptions
from spotckpt.core.schedule import FINAL, SaveSchedule
from spotckpt.core.stage import bounce_buffer_for
from spotckpt.core.steps import CommitPipeline
from spotckpt.core.protocols import RemoteStore
from spotckpt.core.torch_state import capture, replicated_keys

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)

#: restore() has the staging buffer made ready for states at least this large (smaller ones
#: allocate in no time).
RESERVE_MIN_BYTES = 64 * 1024 * 1024


def as_step(step: Any) -> int:
    """A step as a plain int: ints and integer-like values (``numpy.int64``, a 0-dim integer
    tensor) are accepted; anything else, a bool or a negative number is a ConfigError."""
    if type(step) is int and step >= 0:
        return step
    if not isinstance(step, bool):
        try:
            value = operator.index(step)
        except TypeError:
            value = None
        if value is not None and value >= 0:
            return value
    raise ConfigError(f"step must be a non-negative integer, got {step!r} ({type(step).__name__})")


class CheckpointManager:
    """Saves ``state`` atomically under ``local_dir``, syncs to ``s3_uri``, restores the newest
    valid step, and turns SIGTERM into a final durable checkpoint.

    The documented arguments are those of the public API (README, "Use it"). Beyond them:
    ``grace_seconds`` (SIGTERM to SIGKILL, default 120), ``verify_on_restore`` (CRC32C of every
    file before loading, default True), ``allow_pickle`` (store/load values that only pickle can
    represent; off by default, as checkpoints come back from S3), ``install_signal_handlers``,
    ``imds`` (poll the EC2 spot notice; default from ``$SPOTCKPT_IMDS``), ``metrics`` (metric
    lines on stderr; default from ``$SPOTCKPT_METRICS``, on), ``save_policy`` and ``retention``
    (objects from :mod:`spotckpt.policy`, replacing ``every_steps``/``every_seconds`` and
    ``keep_last``; ``every_steps="auto"`` is :class:`spotckpt.policy.AutoInterval`),
    ``remote_store`` (any :class:`spotckpt.core.protocols.RemoteStore` instead of the S3 store of
    ``s3_uri``), ``clock`` (a monotonic clock for ``every_seconds``) and ``upload_while_writing``
    (one process: a save's data file goes to S3 while it is written locally; default from
    ``$SPOTCKPT_UPLOAD_WHILE_WRITING``, on; see docs/s3.md).

    Construction is all or nothing: when it raises, nothing it started is left running and the
    signal handlers are the ones from before.
    """

    def __init__(
        self,
        local_dir: str | os.PathLike[str] | None = None,
        s3_uri: str | None = None,
        *,
        every_steps: int | str | None = 500,
        every_seconds: float | None = None,
        keep_last: int | None = 3,
        async_save: bool = True,
        grace_seconds: float | None = None,
        verify_on_restore: bool = True,
        allow_pickle: bool = False,
        install_signal_handlers: bool = True,
        imds: bool | None = None,
        metrics: bool | None = None,
        save_policy: SavePolicy | None = None,
        retention: RetentionPolicy | None = None,
        remote_store: RemoteStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        replicated: Collection[str] = (),
        collective_timeout_seconds: float | None = None,
        rank: int | None = None,
        upload_while_writing: bool | None = None,
    ) -> None:
        grace = grace_seconds if grace_seconds is not None else env_float("SPOTCKPT_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)
        self._watcher = PreemptionWatcher(grace_seconds=grace)
        self._schedule = SaveSchedule(self._watcher, every_steps=every_steps, every_seconds=every_seconds,
                                      save_policy=save_policy, clock=clock)
        self.save_policy: SavePolicy = self._schedule.policy
        self.retention: RetentionPolicy = retention if retention is not None else retention_from(keep_last)
        self.async_save = async_save
        self.verify_on_restore = verify_on_restore
        self.allow_pickle = allow_pickle
        self.rank = 0
        self.world_size = 1
        self._replicated_hint = tuple(replicated)

        self.stats = Stats()
        self.events = EventBus()
        self.events.subscribe(self.stats, progress=False)
        self._metrics = MetricsListener(enabled=metrics if metrics is not None else env_bool("SPOTCKPT_METRICS", True))
        self.events.subscribe(self._metrics, progress=False)
        self._preempted = False
        self._closed = False
        self._events_file: JsonLinesListener | None = None
        self._store: RemoteStore | None = None
        self._uploader: Any = None
        self._imds: Any = None
        self._coord: Coordinator | None = None
        self._requests: RequestChannel | None = None
        self._abandoned = False
        self.pipeline: CommitPipeline | None = None
        try:
            self._coord = coordinator_from_torch(timeout_seconds=collective_timeout_seconds)
            if self._coord is None and rank not in (None, 0):  # before anything is created on disk
                raise ConfigError(
                    f"rank={rank} but torch.distributed is not initialised; call "
                    "init_process_group() first (rank and world size then come from it)"
                )
            self.local = LocalStore(resolve_local_dir(local_dir))
            self.local_dir = self.local.root
            if self._coord is not None:
                self._join_ranks(rank)
            self.pipeline = CommitPipeline(self.local, events=self.events, retention=self.retention, clock=clock,
                                           coord=self._coord, rank=self.rank, world_size=self.world_size)
            self._schedule.pipe = self.pipeline
            self.pipeline.upload_while_writing = upload_while_writing_enabled(upload_while_writing)
            self.s3_uri = remote_store.uri if remote_store is not None else resolve_s3_uri(s3_uri)
            if self.s3_uri is None and sagemaker_info().checkpoint_sync_active:
                log.info("spotckpt: SageMaker syncs %s to S3 itself; spotckpt uploads nothing", self.local_dir)
            events_path = os.environ.get("SPOTCKPT_EVENTS_FILE")
            if events_path:
                try:
                    self._events_file = JsonLinesListener(events_path)
                except OSError as exc:
                    raise ConfigError(
                        f"cannot open $SPOTCKPT_EVENTS_FILE={events_path} for appending "
                        f"({exc.strerror or exc}); point it at a writable file or unset it"
                    ) from exc
                self.events.subscribe(self._events_file)
            # grace budget, costs and restart history; subscribed last, so its grace_budget and
            # autopilot events follow the save event they come from in every listener
            self._pipe.autopilot = Autopilot(self.events, grace_seconds=grace, uploads=self.s3_uri is not None)
            bind = getattr(self.save_policy, "bind", None)
            if callable(bind):
                bind(self._pipe.autopilot)
            if self.s3_uri is not None:
                self._start_upload(remote_store)
            if self._coord is not None:
                self._coord.exchange("construct")  # every rank got here: none failed above
            if imds if imds is not None else env_bool("SPOTCKPT_IMDS", False):
                self._start_imds()
            if install_signal_handlers:
                self._watcher.install()  # last: nothing after it can fail
            self._pid = os.getpid()
            _OPEN.add(self)
        except BaseException as exc:
            if self._coord is not None and not isinstance(exc, CollectiveError):
                try:  # tell the other ranks, so they raise now instead of at a later timeout
                    self._coord.exchange("construct", error=exc)
                except BaseException:  # noqa: BLE001 - re-raised below as exc
                    pass
            self._teardown()
            raise

    # -- several ranks -------------------------------------------------------------------
    def _join_ranks(self, rank: int | None) -> None:
        coord = self._coord
        assert coord is not None
        if rank is not None and rank != coord.rank:
            raise ConfigError(f"rank={rank} but torch.distributed says this is rank {coord.rank}; drop rank=")
        self.rank, self.world_size = coord.rank, coord.world_size
        if self.world_size > 1:
            self._metrics.rank = self.rank
        coord.set_hosts(str(self.local.root))
        self._requests = RequestChannel(coord.store, coord.rank, coord.world_size)
        self._schedule.agreement = SaveAgreement(self._requests)
        self._schedule.rank = self.rank

    # -- optional components ------------------------------------------------------------
    def _start_upload(self, remote_store: RemoteStore | None) -> None:
        from spotckpt.remote.uploader import Uploader

        if remote_store is None:
            from spotckpt.remote.s3 import S3Store

            self._store = S3Store(self.s3_uri)  # type: ignore[arg-type]
            self._store.check_access()  # a caller's own remote_store is the caller's to check
        else:
            self._store = remote_store
        pipe = self._pipe
        pipe.store = self._store
        if not pipe.leader:
            return  # every rank lists and reads S3 (restore); each host's leader uploads its files
        self._uploader = Uploader(self.local_dir, self._store, retention=self.retention, on_uploaded=pipe.on_uploaded,
                                  world_size=self.world_size, writes_manifest=self.rank == 0,
                                  await_hosts_seconds=self._coord.timeout_seconds if self._coord else 600.0)
        pipe.uploader = self._uploader
        self._uploader.start()

    @property
    def _pipe(self) -> CommitPipeline:
        assert self.pipeline is not None
        return self.pipeline

    def _start_imds(self) -> None:
        from spotckpt.core.preemption import ImdsPoller

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
    def restore(self, state: MutableMapping[str, Any], *, step: int | None = None,
                start_fresh_if_corrupt: bool = False) -> int | None:
        """Load the newest valid step (local, else S3) into ``state`` in place; return it, or
        None when there is no checkpoint yet.

        ``state`` is checked first with ``save()``'s rules (StateError naming the key), and the
        load is all or nothing: every key, structure, shape and dtype is checked before the
        first byte or value lands. When committed steps exist and none verifies,
        AllStepsCorruptError names each; ``start_fresh_if_corrupt=True`` starts from scratch
        instead (the damaged steps are moved aside, not deleted). Steps newer than the one
        loaded will be written again by this run: they are moved aside locally (logged) and
        un-committed in S3, so a later save of the same step is never mistaken for done."""
        self._check_open()
        if step is not None:
            step = as_step(step)
        err: BaseException | None = None
        snap = None
        try:
            snap = capture(state, step=0, rank=self.rank, allow_pickle=self.allow_pickle)  # save()'s rules, up front
        except StateError as exc:
            err = exc
        self._pipe.agree_ok("restore: state", err)
        opts = RestoreOptions(step=step, verify=self.verify_on_restore, allow_pickle=self.allow_pickle,
                              bounce=bounce_buffer_for(state), progress=progress_logger())
        res = self._pipe.restore(state, opts, start_fresh_if_corrupt=start_fresh_if_corrupt)
        if self.async_save and snap is not None and snap.nbytes >= RESERVE_MIN_BYTES and self.rank == 0:
            # the first async save would allocate and fault in the staging buffer: do it now, off
            # this thread (rank 0 stages the whole state; the other ranks only their own keys)
            self._pipe.reserve_staging(snap.tensors)
        if res is None:
            log.info("spotckpt: no checkpoint in %s%s; starting fresh", self.local_dir,
                     f" or {self.s3_uri}" if self.s3_uri else "")
            return None
        return res.step

    # -- save ----------------------------------------------------------------------------
    def save(self, step: int, state: MutableMapping[str, Any], *, blocking: bool | None = None) -> None:
        """Checkpoint ``state`` as ``step``. Asynchronous by default (``async_save``): returns
        once the tensors are copied to host memory; ``blocking=True`` returns once the step is
        committed locally. A save while the previous one is persisting waits for it. Saving a
        step that is already committed is a no-op (logged): a committed step is never replaced.
        Several ranks: collective, every rank with the same step."""
        self._save(step, state, blocking=blocking, policy=False)

    def _save(self, step: int, state: MutableMapping[str, Any], *, blocking: bool | None, policy: bool) -> bool:
        """The save; ``policy``: a policy save, skipped (on every rank) while one is persisting.
        The state is captured first (its structure, no copies), so a state that cannot be saved
        fails on every rank at the agreement instead of leaving the others waiting."""
        self._check_open()
        err: BaseException | None = None
        try:
            step = as_step(step)
        except ConfigError as exc:
            err = exc
        if self._coord is None:
            if err is not None:
                raise err
            self._pipe.raise_bg_error()
        blocking = (not self.async_save) if blocking is None else blocking
        t0 = time.perf_counter()
        replicated = replicated_keys(state, self._replicated_hint) if self._coord is not None else set()
        keys = None if self.rank == 0 else set(state) - replicated
        snap = None
        if err is None:
            try:
                snap = capture(state, step=step, rank=self.rank, allow_pickle=self.allow_pickle, keys=keys)
            except SpotCkptError as exc:
                err = exc
        outcome = self._pipe.save_state(step, snap, keys=[str(k) for k in state], replicated=replicated,
                                        blocking=blocking, policy=policy, error=err, t0=t0)
        if outcome == "busy":
            self.stats.saves_skipped += 1
            log.info("spotckpt: skipping the policy save of step %d: a rank is still writing the last one", step)
        return outcome == "saved"

    def maybe_save(self, step: int, state: MutableMapping[str, Any]) -> bool:
        """Save when the policy says so (``every_steps`` / ``every_seconds``) or when the job is
        being preempted -- then synchronously, flushed (and uploaded within the deadline), and
        ``preempted`` becomes True. Returns whether a save was made. Several ranks: call it on
        every rank every step; a preemption noticed on any rank becomes a save of one agreed
        step on all of them (see :class:`spotckpt.ranks.dist.RequestChannel`)."""
        self._check_open()
        if type(step) is not int:
            step = as_step(step)
        if self.events.takes_progress:  # the events file, a user's listener
            self.events.emit(ProgressEvent(step=step))
        if self._preempted:
            return False
        if self._coord is not None:
            return self._maybe_save_ranks(step, state)
        if self._watcher.requested:
            return self._final_save(step, state, self._watcher.reason or "requested")
        pipe = self.pipeline
        if step == pipe.last_saved_step or not self.save_policy.should_save(self._schedule.context(step)):
            return False
        job = pipe.pending
        if job is not None and not job.done.is_set():
            self.stats.saves_skipped += 1
            log.info("spotckpt: skipping the policy save of step %d: step %d is still being written", step, job.step)
            return False
        return self._save(step, state, blocking=None, policy=True)

    def preemption_due(self, step: int) -> bool:
        """Whether to make the preemption save now, at ``step``: for code whose saves a framework
        makes (the integrations ask the framework to save, then :meth:`adopt` what it wrote).
        One process: as soon as SIGTERM (or the spot notice) arrived. Several ranks: call it on
        every rank at every step; a preemption noticed on any rank makes it True on every rank
        at the same agreed step (:class:`spotckpt.ranks.dist.RequestChannel`: a local read per step,
        no collective), and ``preemption_requested`` then holds on every rank, the grace
        counted from that moment where the signal did not arrive."""
        self._check_open()
        return self._schedule.preemption_due(as_step(step))

    def _maybe_save_ranks(self, step: int, state: MutableMapping[str, Any]) -> bool:
        """Several ranks: what :meth:`spotckpt.core.schedule.SaveSchedule.due_ranks` says."""
        due = self._schedule.due_ranks(step)
        if due is None:
            return False
        if due[0] == FINAL:
            return self._final_save(step, state, due[1])
        return self._save(step, state, blocking=None, policy=True)

    def _final_save(self, step: int, state: MutableMapping[str, Any], reason: str) -> bool:
        """The preemption save: it ends with ``step`` committed locally and, with S3, uploaded
        -- or raises (SaveError when the upload did not finish before the deadline)."""
        self.events.emit(PreemptedEvent(step=step, reason=reason))
        saved = self._save(step, state, blocking=True, policy=False)
        self._preempted = True  # committed locally: whatever the upload does, the loop must stop
        try:
            ok = self.wait(timeout=self._watcher.seconds_left())
        except SpotCkptError as exc:
            if not isinstance(exc, (StorageError, CollectiveError)):
                raise
            raise SaveError(
                f"the final checkpoint (step {step}) is committed in {self.local_dir} but did not reach "
                f"{self.s3_uri}: its upload failed ({exc}); a new instance resumes from the newest step in S3 -- check "
                "S3 access, and the next run's uploader uploads this step if this disk survives", step=step,
            ) from exc
        if not self.local.is_committed(step) and self._pipe.leader:
            raise SaveError(f"the final checkpoint (step {step}) is not committed in {self.local_dir}; the "
                            "newest earlier step is the resume point", step=step)
        if not ok:
            in_s3 = sorted(self._uploader.uploaded_steps()) if self._uploader is not None else []
            raise SaveError(
                f"the final checkpoint (step {step}) is committed in {self.local_dir} but did not reach "
                f"{self.s3_uri} before the deadline ({self._watcher.grace_seconds:.0f} s grace); a new "
                f"instance resumes from step {in_s3[-1] if in_s3 else 'none'} in S3 -- save fewer bytes, "
                "use faster storage or a longer grace (SPOTCKPT_GRACE_SECONDS)", step=step)
        return saved

    def wait_persist_idle(self) -> None:
        """Block until this rank's pending async save has finished on the persist thread
        (committed, or failed: its error still surfaces from the next ``save()``/``wait()``).
        Not collective; any thread. :mod:`spotckpt.dcp`'s writer calls it before its commit,
        whose collectives share that thread's gloo group."""
        self._pipe.wait_idle()

    # -- wait / queries --------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until the last save is committed locally and, with S3, uploaded. Returns False
        when ``timeout`` (seconds) ran out first. Raises a background error, if any. Several
        ranks: collective; True only when the step is durable for every rank."""
        if self._coord is None:
            return self._pipe.wait(timeout)
        ok, err = False, None
        try:
            ok = self._pipe.wait(timeout)
        except SpotCkptError as exc:
            err = exc
        return all(self._coord.exchange("wait", ok, error=err))


    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Committed steps, ascending: local, plus S3 when configured -- those retention keeps
        (a step retention is about to delete is not shown, so never more than ``keep_last``)."""
        self._check_open()
        steps = set(self.local.committed_steps())
        if self._store is not None:
            steps |= set(self._store.list_steps())
        return sorted(self.retention.kept(steps))

    # -- lifecycle -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this CheckpointManager is closed; create a new one")

    def check_open(self) -> None:
        """ClosedError once :meth:`close` has begun (for spotckpt's adapters)."""
        self._check_open()

    def close(self, *, timeout: float | None = None, abandon: bool = False) -> None:
        """Finish pending work (local save, upload), stop threads, restore signal handlers.
        Several ranks: collective (every rank closes), unless closing after an exception.
        ``abandon=True`` (what leaving a ``with`` block by an exception does): no waiting for
        S3 and no collective -- for when the other ranks or the store may be gone; committed
        local steps stay, and the next run's uploader or restore picks them up."""
        if abandon:
            self._abandoned = True
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        err: BaseException | None = None
        try:
            err = self._pipe.close(flush=not self._abandoned, timeout=timeout)
            if self._coord is not None and not self._abandoned:
                self._coord.exchange("close", error=err)
        finally:
            self._teardown()
            if getattr(self, "local", None) is not None:
                self.local.release_staging()  # nothing of this process is left in it
        self._pipe.raise_kept()
        if err is not None:
            raise err

    def _close_at_exit(self) -> None:
        """A manager still open when the interpreter exits (no ``with``, no ``close()``): its
        save in flight would die with the process's threads. It is closed here, said so, as
        leaving a ``with`` block by an exception closes: the local save finishes, nothing waits
        for S3 and nothing is collective -- the next run's uploader or restore picks a committed
        step up."""
        if self._closed or os.getpid() != getattr(self, "_pid", None):
            return
        pending = self.pipeline.pending if self.pipeline is not None else None
        busy = pending is not None and not pending.done.is_set()
        log.warning("spotckpt: the CheckpointManager of %s was not closed; closing it at exit%s (use `with "
                    "CheckpointManager(...)` or call close(), which also waits for the upload)", self.local_dir,
                    f" so that step {pending.step} is committed locally" if busy else "")
        try:
            self.close(abandon=True)
        except Exception as exc:  # noqa: BLE001 - at exit: said, not raised
            log.error("spotckpt: closing at exit failed: %s", exc)

    def _teardown(self) -> None:
        """Stop whatever was started, in reverse order (construction failures and close())."""
        self._closed = True
        if self.pipeline is not None:
            self.pipeline.stop()
        if self._uploader is not None:
            self._uploader.close()
        if self._store is not None:
            self._store.close()
        if self._imds is not None:
            self._imds.close()
        if self._requests is not None:
            self._requests.close()
        if self._coord is not None:
            self._coord.close()
        self._watcher.uninstall()
        if self._events_file is not None:
            self._events_file.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            # the other ranks may be anywhere, and an upload may never complete: no collective
            # and no waiting for S3 on the way out (committed local steps are safe; the next
            # run's uploader or restore picks them up)
            self._abandoned = True
            try:
                self.close()
            except SpotCkptError as close_exc:
                log.error("spotckpt: while closing after an error: %s", close_exc)

    # -- folders other code writes (spotckpt.core.adopt; integrations use these) -----------------
    def adopt(self, step: int, folder: str | os.PathLike[str] | None, *, blocking: bool = True,
              meta: dict[str, Any] | None = None) -> Path:
        """Commit ``folder`` -- a directory (or one file) another program wrote, e.g. a Hugging
        Face ``checkpoint-N`` -- as ``step``: every file copied with its CRC32C, the manifest
        (``"layout": "folder"``, ``meta`` under ``"meta"``), the atomic rename, then retention
        and the upload, like a save. Returns the step's path. ``blocking=False`` copies on the
        persist thread: leave the folder alone until ``wait()``. A committed step is never
        replaced (no-op). FolderChangedError (nothing committed) when the folder changes while
        it is copied; ConfigError for what cannot be adopted.

        Several ranks: collective, called by every rank after its part of the framework's save
        (a rank that wrote nothing passes the same folder, or None). Each host's files of the
        folder are committed as one step, one manifest listing every host's files
        (:mod:`spotckpt.core.adopt_ranks`)."""
        self._check_open()
        return adopt_folder(self._pipe, as_step(step), folder, blocking=blocking, meta=meta)

    def restore_folder(self, *, step: int | None = None, start_fresh_if_corrupt: bool = False) -> Path | None:
        """The path of the newest adopted step that verifies (or of ``step``): local, else
        downloaded from S3, CRC32C-checked and committed locally. None when there is none;
        AllStepsCorruptError when adopted steps exist and none verifies (as ``restore()``;
        ``start_fresh_if_corrupt=True`` moves them aside and returns None). The framework loads
        its own files from there; spotckpt reads them only to verify. ConfigError for a step
        written by ``save()`` (use ``restore(state)``).

        Several ranks: collective; the same step on every rank, and every host's ``local_dir``
        then holds the whole step (files other hosts wrote come from S3, else from those hosts
        over spotckpt's gloo group), as frameworks load it on every node."""
        self._check_open()
        opts = RestoreOptions(step=None if step is None else as_step(step), verify=self.verify_on_restore,
                              progress=progress_logger(), loader=lambda path, manifest, rank: FOLDER.require(manifest, path))
        return restore_folder(self._pipe, opts, start_fresh_if_corrupt=start_fresh_if_corrupt)


#: Managers constructed and not closed yet (see :meth:`CheckpointManager._close_at_exit`).
_OPEN: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


def _close_open_managers() -> None:
    for mgr in list(_OPEN):
        mgr._close_at_exit()


# At the interpreter's threading shutdown, before concurrent.futures' own hook (hooks run in
# reverse order of registration, and spotckpt imported concurrent.futures before this line):
# the save still has its thread pools then. atexit would run after them, too late.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_close_open_managers)
else:  # pragma: no cover - Python without the hook
    atexit.register(_close_open_managers)
