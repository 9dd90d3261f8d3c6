"""The commit pipeline: every writer -- ``save()``, ``adopt()`` and :mod:`spotckpt.dcp`'s
``StorageWriter`` -- commits a step through one :class:`CommitPipeline`, owned by the manager.

What it holds, in the order a save meets it::

    committed(step)        the one "is this step done already?" -- this run's own save or
                           restore, or an earlier run's committed step that still verifies
                           (a damaged one is moved aside and written again); with several
                           ranks the host leaders judge and every rank follows (agree_committed)
    stamp(...)             the one manifest stamp: writer, world size, layout, extras
    write_snapshot(...)    a captured state -> staged (or written straight from host memory) ->
                           files + manifest -> atomic rename, here or on the persist thread
    commit(...)            any other writer's files (adopt, DCP) through the same announce
    announce(step, ...)    save event when save() returns; once committed, the durable_local
                           event, the uploader told, local retention queued
    note_restore / roll_back   the run's timeline: what this run saved or
                           restored last, and newer steps that stop counting when it goes back

Threads: the training thread calls everything; the persist thread (``spotckpt-persist``) runs
the jobs the pipeline submits -- the write of an async save and local retention -- and calls
back only into this module; the uploader's thread calls :meth:`on_uploaded`.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spotckpt._version import __version__
from spotckpt.ranks.dist import Coordinator, check_save
from spotckpt.errors import AllStepsCorruptError, ClosedError, SaveError, SpotCkptError
from spotckpt.events import DurableLocalEvent, DurableS3Event, EventBus, RestoreEvent, SaveEvent
from spotckpt.format import FileEntry, Manifest, data_file_names, utc_now_iso, write_file_durably, write_safetensors
from spotckpt.core.local import LocalStore
from spotckpt.core.persist import CallJob, PersistWorker, PruneJob, SaveJob
from spotckpt.policy import KeepAll, RetentionPolicy
from spotckpt.core.restore import RestoreOptions, RestoreResult, restore_newest
from spotckpt.core.restore_ranks import restore_agreed
from spotckpt.ranks.shard import recording_shards, shards_metadata
from spotckpt.core.stage import Stager
from spotckpt.core import early_upload

if TYPE_CHECKING:
    from spotckpt.core.protocols import RemoteStore
    from spotckpt.core.torch_state import Snapshot

__all__ = ["CommitPipeline", "write_step", "commit_files"]

log = logging.getLogger(__name__)

#: Manifest extras that differ between processes (the autopilot's history, spotckpt.autopilot):
#: with several ranks, rank 0's go into every host's manifest, so all hosts write the same one.
RANK0_EXTRA = ("autopilot", "final_save")


class CommitPipeline:
    """One manager's way from a step's bytes to a committed (and uploaded) step; see the
    module docstring. ``uploader`` and ``store`` are set by the manager when S3 is configured."""

    def __init__(self, local: LocalStore, *, events: EventBus, retention: RetentionPolicy,
                 clock: Callable[[], float], coord: Coordinator | None = None, rank: int = 0,
                 world_size: int = 1) -> None:
        self.local = local
        self.events = events
        self.retention = retention
        self.coord = coord
        self.rank = rank
        self.world_size = world_size
        self.store: RemoteStore | None = None
        self.uploader: Any = None
        self.autopilot: Any = None  # spotckpt.autopilot.Autopilot: its history goes into every stamp
        self.upload_while_writing = False  # set by the manager (spotckpt.core.early_upload)
        self.closed = False
        self._clock = clock
        self._lock = threading.Lock()
        self.stager = Stager()
        self.persist = PersistWorker(prune=self._prune, on_error=self._on_persist_error)
        self.pending: SaveJob | None = None
        self._bg_error: BaseException | None = None
        self.last_saved_step: int | None = None
        self.last_save_time = clock()
        self._save_started: dict[int, float] = {}  # step -> perf_counter() at save(), until in S3
        self._rollback_to: int | None = None  # a restore of an explicit step: roll back at the first save

    @property
    def leader(self) -> bool:
        """Whether this rank commits, prunes and uploads its host's ``local_dir``."""
        return self.coord is None or self.coord.is_host_leader

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError("this CheckpointManager is closed; create a new one")

    # -- the one "committed" -------------------------------------------------------------
    def committed(self, step: int) -> bool:
        """Whether a save of ``step`` must be skipped because the step is done: this run saved
        or restored it, or an earlier run committed it and it verifies (CRC32C) -- a step that
        does not is moved aside, so the save writes it again. With several ranks only host
        leaders judge their disk (the others answer False and follow the agreement)."""
        if step == self.last_saved_step:
            return True
        if not self.leader or not self.local.is_committed(step):
            return False
        check = self.local.verify_step(step)
        if check.ok:
            self.local.mark_verified(step)
            return True
        self.local.quarantine(step, "committed by an earlier run but does not verify ("
                              + "; ".join(check.problems)[:300] + "); saving it again")
        return False

    def agree_committed(self, step: int, *, error: BaseException | None = None, group: str = "main") -> bool:
        """:meth:`committed`, the same on every rank (one exchange; any rank's ``error`` is
        raised on all of them). True: the caller skips the save (see :meth:`skip`)."""
        done = error is None and self.committed(step)
        if self.coord is not None:
            return any(self.coord.exchange(f"committed {step}", done, error=error, group=group))
        if error is not None:
            raise error
        return done

    def agree_ok(self, what: str, error: BaseException | None, *, group: str = "main") -> None:
        """Every rank got past ``what``, or every rank raises the first rank's error (one
        exchange; one process: raise ``error``)."""
        if self.coord is not None:
            self.coord.exchange(what, None, error=error, group=group)
        elif error is not None:
            raise error

    def skip(self, step: int) -> None:
        """A save of a committed step: a committed step is never replaced. Said at INFO when this
        run saved it (a final save() after maybe_save() of the same step), as a WARNING when it is
        an earlier run's."""
        if step == self.last_saved_step:
            log.info("spotckpt: step %d is already committed in %s; not saving it again", step, self.local.root)
        else:
            log.warning("spotckpt: step %d is already committed in %s by an earlier run; a committed step is never "
                        "replaced, so this save was skipped -- steps must increase across restarts (resume from "
                        "mgr.restore())", step, self.local.root)
        self.last_saved_step = step

    # -- a state's save --------------------------------------------------------------------
    def save_state(self, step: int, snap: Snapshot | None, *, keys: Collection[str], replicated: Collection[str],
                   blocking: bool, policy: bool, error: BaseException | None, t0: float) -> str:
        """``save()`` of a captured state (``snap``; None when capturing it failed: ``error``).
        One process: wait for the pending save, skip a committed step, write. Several ranks: the
        same, agreed first (:func:`spotckpt.ranks.dist.check_save`: any rank's error -- a bad
        state, a failed background save -- is raised on every rank, and a policy save is skipped
        on every rank while one still writes). Returns "saved", "committed" (skipped: the step
        is done) or "busy"."""
        self.roll_back_before_saving()
        busy = self.coord is not None and policy and self.busy()
        if not busy:
            try:
                self.wait_pending()
            except SpotCkptError as exc:
                if self.coord is None:
                    raise
                error = error or exc
        done = error is None and self.committed(step)
        if self.coord is not None:
            check = check_save(self.coord, step=step, keys=sorted(keys), replicated=sorted(replicated), busy=busy,
                               committed=done, error=error)
            if check.skip == "busy":
                return "busy"
            self.wait_pending()
            done = check.skip == "committed"
        elif error is not None:
            raise error
        if done:
            self.skip(step)
            return "committed"
        assert snap is not None
        meta = {"format": "spotckpt/1", "step": str(step)}
        if snap.sharded_keys:
            meta.update(shards_metadata(snap.shards))
        extra = self.stamp(replicated=sorted(replicated), sharded=sorted(snap.sharded_keys))
        self.write_snapshot(step, snap, meta, extra, blocking=blocking, t0=t0)
        return "saved"

    # -- the one stamp ---------------------------------------------------------------------
    def stamp(self, *, layout: str | None = None, **extra: Any) -> dict[str, Any]:
        """The manifest's extras of a step this run writes: who wrote it, with how many ranks,
        in which layout (None: a state saved by ``save()``), and the writer's own ``extra``
        (empty values left out)."""
        out: dict[str, Any] = {"writer": f"spotckpt {__version__}", "world_size": self.world_size}
        if self.autopilot is not None:
            out.update(self.autopilot.manifest_extra())
        if layout is not None:
            out["layout"] = layout
        out.update({k: v for k, v in extra.items() if v})
        return out

    # -- writing ---------------------------------------------------------------------------
    def write_snapshot(self, step: int, snap: Snapshot, meta: dict[str, str], extra: dict[str, Any], *,
                       blocking: bool, t0: float) -> None:
        """Write a captured state as ``step``: host tensors of a blocking save straight from
        their memory; device tensors and async saves through the stager (one pinned
        device-to-host pass; an async save then returns while the persist thread writes)."""
        staged: Any = None
        if blocking and all(t.device.type == "cpu" for t in snap.tensors.values()):
            def write_tensors(path: Path, **kw: Any) -> FileEntry:
                return write_safetensors(path, snap.tensors, meta, **kw)

            def chunks() -> list[Any] | None:
                return early_upload.host_chunks(snap.tensors, meta)
        else:
            with self._lock:
                staged = self.stager.stage(snap.tensors, meta)
            write_tensors = staged.write_to

            def chunks() -> list[Any] | None:
                staged.wait_ready()
                return early_upload.staged_chunks(staged)
        self.commit(step, lambda: self._write_captured(step, snap, write_tensors, extra, staged, chunks),
                    t0=t0, nbytes=snap.nbytes, blocking=blocking)

    def _write_captured(self, step: int, snap: Snapshot, write_tensors: Callable[..., FileEntry],
                        extra: dict[str, Any], staged: Any, chunks: Callable[[], list[Any] | None]) -> None:
        """:meth:`write_snapshot`'s files, uploaded while they are written where the store can
        (:mod:`spotckpt.core.early_upload`: one process with an uploader), then the staging
        buffer (if any) released. A failed write aborts the early upload before it raises."""
        rel = data_file_names(self.rank)[0]
        early = None
        try:
            if self.upload_while_writing and self.uploader is not None and self.coord is None:
                assert self.store is not None
                try:
                    parts = chunks()
                    early = None if parts is None else self.store.start_upload(step, rel, parts)
                except Exception as exc:  # noqa: BLE001 - the ordinary upload still follows the commit
                    log.warning("spotckpt: could not start uploading step %d while writing it (%s); it is uploaded "
                                "after the local commit", step, exc)
            try:
                path = self.write_files(step, snap.tree, recording_shards(snap.tree, snap.shards, snap.tensors,
                                                                          write_tensors), extra)
            except BaseException:
                if early is not None:
                    early.abort()
                raise
            if early is not None:
                early.committed(path / rel)
        finally:
            if staged is not None:
                with self._lock:
                    self.stager.release(staged)

    def write_files(self, step: int, tree: dict[str, Any], write_tensors: Callable[[Path], FileEntry],
                    extra: dict[str, Any], *, group: str = "persist") -> Path:
        """This rank's files of ``step`` (its tensors and tree) written and the step committed
        -- with several ranks, once every rank's are durable (:func:`write_step`)."""
        return write_step(self.local, step, tree, write_tensors, rank=self.rank, extra=extra, coord=self.coord,
                          group=group)

    def commit(self, step: int, write: Callable[[], Any], *, t0: float, nbytes: int, blocking: bool) -> None:
        """Every writer's way to a committed step: ``write`` commits it (:meth:`write_files`,
        or an adopted folder's copy), then :meth:`announce` -- here (``blocking``), or on the
        persist thread (async: the save event when this returns, the rest once committed)."""
        def run() -> None:
            write()
            self.announce(step, t0, nbytes, returned=blocking, committed=True)

        if blocking:
            run()
            return
        self.pending = SaveJob(step, run)
        self.announce(step, t0, nbytes, returned=True, committed=False)
        self.persist.submit(self.pending)

    def announce(self, step: int, t0: float, nbytes: int, *, returned: bool, committed: bool) -> None:
        """A save's bookkeeping and events, in the order things happened. ``returned``: the save
        returns to its caller -- remember it, start its S3 clock, emit the save event.
        ``committed``: the step is committed locally -- the durable_local event, the uploader
        told, local retention queued on the persist thread (off this save's critical path). A
        blocking save does both at once: its save event comes between the commit and the
        durable_local event."""
        if returned:
            self.last_saved_step = step
            self.last_save_time = self._clock()
            if self.uploader is not None:
                with self._lock:
                    self._save_started[step] = t0
            self.events.emit(SaveEvent(step=step, stall_s=time.perf_counter() - t0, bytes=nbytes,
                                       blocking=committed))
        if committed:
            self.events.emit(DurableLocalEvent(step=step, seconds=time.perf_counter() - t0, bytes=nbytes))
            if self.uploader is not None:
                self.uploader.notify(step)
            if not isinstance(self.retention, KeepAll) and self.leader:
                self.persist.submit(PruneJob(step))

    def reserve_staging(self, tensors: Mapping[str, Any]) -> None:
        """Have the persist thread make the staging buffer ready for ``tensors`` (after a
        restore, before the first async save), so that save does not stall on allocating it."""
        def reserve() -> None:
            with self._lock:
                self.stager.reserve(tensors)

        self.persist.submit(CallJob(reserve, "reserving the staging buffer"))

    def _prune(self, protect: int) -> None:
        try:
            self.local.prune(self.retention, protect=protect)
        except SpotCkptError as exc:
            log.warning("spotckpt: local retention failed: %s", exc)

    # -- the persist thread's results ----------------------------------------------------
    def _on_persist_error(self, job: SaveJob, exc: BaseException) -> None:
        self._bg_error = exc

    def busy(self) -> bool:
        """An async save is still being written."""
        job = self.pending
        return job is not None and not job.done.is_set()

    def wait_pending(self) -> None:
        """Wait for the pending async save; raise its error (and the uploader's) here."""
        self.wait_idle()
        self.raise_bg_error()

    def wait_idle(self) -> None:
        """Wait for the pending async save without raising: its error surfaces later."""
        job = self.pending
        if job is not None:
            job.done.wait()

    def raise_bg_error(self) -> None:
        """A background save's error on the caller's thread: a SpotCkptError as a copy of the
        same class (a failed async save raises what a blocking one would), chained to the
        original; anything else as SaveError. Then the uploader's, if any."""
        self.raise_kept("an earlier background save failed")
        if self.uploader is not None:
            self.uploader.raise_if_failed()

    def raise_kept(self, what: str = "a background save failed") -> None:
        """Raise the kept background error, if any (once)."""
        exc, self._bg_error = self._bg_error, None
        if exc is not None:
            if isinstance(exc, SpotCkptError):
                raise copy.copy(exc) from exc
            raise SaveError(f"{what}: {exc!r}") from exc

    def wait(self, timeout: float | None) -> bool:
        """This rank's last save committed and, with S3, uploaded; False when ``timeout`` ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.pending
        if job is not None and not job.done.wait(timeout):
            return False
        if timeout is None:
            self.persist.join_queue()  # retention of the last save has run too
        self.raise_bg_error()
        if self.uploader is not None and self.last_saved_step is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = bool(self.uploader.wait_for(self.last_saved_step, timeout=left))
            self.uploader.raise_if_failed()
            return ok
        return True

    def close(self, *, flush: bool, timeout: float | None) -> SpotCkptError | None:
        """Finish: the pending write, retention and (``flush``) the upload. Returns the
        upload's error, if any; a background save's error is raised by :meth:`stop`."""
        self.closed = True
        self.wait_idle()
        if self.uploader is not None and flush:
            self.persist.join_queue()
            try:
                self.uploader.flush(timeout=timeout)
            except SpotCkptError as exc:
                return exc
        return None

    def stop(self) -> None:
        """Stop the persist thread and free the staging buffers (close and failed
        construction). A background save's error nobody has seen yet stays for
        :meth:`raise_kept`."""
        self.closed = True
        self.persist.stop()
        self.stager.close()

    # -- the run's timeline ----------------------------------------------------------------
    def restore(self, state: Any, opts: RestoreOptions, *, start_fresh_if_corrupt: bool = False) -> RestoreResult | None:
        """Restore through the candidate walk -- agreed by every rank when there are several --
        into ``state`` or ``opts.loader`` (the layout's loader), and note it (newer steps roll
        back). When steps exist and none verifies: AllStepsCorruptError, or, with
        ``start_fresh_if_corrupt``, a fresh start (the damaged steps moved aside)."""
        try:
            if self.coord is not None:
                res = restore_agreed(state, self.local, self.store, self.coord, opts)
            else:
                res = restore_newest(state, self.local, self.store, opts, rank=self.rank)
        except AllStepsCorruptError as exc:
            if not start_fresh_if_corrupt:
                raise
            log.warning("spotckpt: no checkpoint verifies; starting fresh as asked (start_fresh_if_corrupt=True):\n%s",
                        exc)
            self.roll_back(None)
            return None
        if res is not None:
            self.note_restore(res, explicit=opts.step is not None)
            if res.keep_local is not None:  # loaded from memory: the local copy is made off this thread
                self.persist.submit(CallJob(res.keep_local, f"keeping the restored step {res.step} locally"))
        return res

    def on_uploaded(self, step: int, seconds: float, nbytes: int) -> None:
        """Uploader thread: a step's manifest is in S3. ``since_save_s`` runs from ``save()``."""
        with self._lock:
            t0 = self._save_started.get(step)
            for s in [s for s in self._save_started if s <= step]:  # older ones were skipped
                del self._save_started[s]
        since = time.perf_counter() - t0 if t0 is not None else None
        self.events.emit(DurableS3Event(step=step, seconds=seconds, bytes=nbytes, since_save_s=since))

    def note_restore(self, res: Any, *, explicit: bool = False) -> None:
        """Step ``res.step`` was restored (several ranks: on every rank). Newer steps are rolled
        back: now when the restore chose the step (the newer ones did not load), or at the
        first save after it when the caller asked for this step (``explicit``: the newer steps
        are good, and a restore only to look at an older step must not cost them)."""
        if explicit:
            self._rollback_to = res.step
        else:
            self.roll_back(res.step)
        self.last_saved_step = res.step
        self.last_save_time = self._clock()
        self.events.emit(RestoreEvent(step=res.step, seconds=res.seconds, source=res.source, bytes=res.bytes))
        if self.autopilot is not None:
            self.autopilot.restored(res.step, res.path, res.seconds)

    def roll_back_before_saving(self, *, group: str = "main") -> None:
        """The first save after restoring an explicitly chosen older step: the run diverges
        from the newer steps here, so they stop counting now (see :meth:`roll_back`).
        ``group``: the gloo group of the calling thread's collectives (the DCP writer's:
        ``persist``)."""
        if self._rollback_to is not None:
            chosen, self._rollback_to = self._rollback_to, None
            self.roll_back(chosen, group=group)

    def roll_back(self, chosen: int | None, *, group: str = "main") -> None:
        """A restore chose step ``chosen`` (None: a fresh start over damaged steps). This run
        writes the newer steps again, so they stop counting: each host's leader moves its newer
        committed steps aside (kept as evidence until retention), the manifest writer (rank 0)
        un-commits them in S3 -- while the uploader holds off those steps -- and, with several
        ranks, every rank waits until every host is done. Nothing happens when none is newer."""
        def newer(steps: Collection[int]) -> list[int]:
            return sorted(s for s in steps if chosen is None or s > chosen)

        def action() -> None:
            if self.leader:
                for s in newer(self.local.committed_steps()):
                    self.local.quarantine(s, f"the restore chose {'no step' if chosen is None else f'step {chosen}'}, "
                                             "and this run will write this step again")
            if self.store is not None and self.rank == 0:
                for s in newer(self.store.list_steps()):
                    log.warning("spotckpt: un-committing step %d in %s (its manifest is deleted, its data kept "
                                "until the step is written again): the restore chose %s", s, self.store.uri,
                                "no step" if chosen is None else f"step {chosen}")
                    self.store.uncommit_step(s)

        err: BaseException | None = None
        try:
            if self.uploader is not None:
                self.uploader.roll_back(chosen, action)
            else:
                action()
        except SpotCkptError as exc:
            err = exc
        self.agree_ok("restore: roll back", err, group=group)


def write_step(
    local: LocalStore,
    step: int,
    tree: dict[str, Any],
    write_tensors: Callable[[Path], FileEntry],
    *,
    rank: int = 0,
    extra: dict[str, Any] | None = None,
    coord: Coordinator | None = None,
    group: str = "persist",
) -> Path:
    """Write one rank's files for ``step`` (its tensors and tree) and commit the step
    (:func:`commit_files`); returns the step path."""
    def write_files(staging: Path) -> dict[str, FileEntry]:
        return _write_rank_files(staging, step, tree, write_tensors, rank)

    return commit_files(local, step, write_files, extra=extra, coord=coord, group=group)


def commit_files(
    local: LocalStore,
    step: int,
    write_files: Callable[[Path], dict[str, FileEntry]],
    *,
    extra: dict[str, Any] | None = None,
    coord: Coordinator | None = None,
    group: str = "persist",
) -> Path:
    """Commit ``step`` from the files ``write_files(staging)`` writes into a staging directory
    (returning each one's size and CRC32C): the one commit of a saved state, a DCP step and an
    adopted folder. Returns the step path.

    One process: a private staging directory, committed at once. Several ranks (``coord``):
    every rank of a host writes into the host's shared staging directory (a rank may write
    nothing); the entries of every rank are exchanged (rank 0 adds the ``created`` time and its
    per-process extras, so every host writes the same global manifest, which lists each path
    once: the lowest rank's entry wins, and a host whose copy of a path differs leaves its copy
    out); then each host's leader commits its directory, and a second exchange makes sure every
    host committed before anyone returns. Any rank's failure is raised on every rank, and no
    host commits. On any failure the staging directory is removed and one typed error raised
    (SaveError for the disk, StateError for a value that cannot be serialised)."""
    if coord is None:
        return local.write_step(step, write_files, extra=extra)
    staging = local.shared_staging(step, owner_pid=coord.leader_pid)
    files: dict[str, FileEntry] = {}
    err: BaseException | None = None
    try:
        files = write_files(staging)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank below
        err = local.write_error(exc, step)
    mine = {"files": {k: [v.size, v.crc32c] for k, v in files.items()},
            "created": utc_now_iso() if coord.rank == 0 else None,
            "rank0": {k: v for k, v in (extra or {}).items() if k in RANK0_EXTRA} if coord.rank == 0 else None}
    try:
        recs = coord.exchange(f"write step {step}", mine, error=err, group=group)
    except BaseException:
        if coord.is_host_leader:
            local.abort(staging)
        raise
    every: dict[str, FileEntry] = {}
    for rec in recs:
        for k, v in rec["files"].items():
            every.setdefault(k, FileEntry(int(v[0]), str(v[1])))
    extra = {**{k: v for k, v in (extra or {}).items() if k not in RANK0_EXTRA}, **(recs[0]["rank0"] or {})}
    manifest = Manifest(step=step, files=every, created=recs[0]["created"], extra=extra)
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
    coord.exchange(f"commit step {step}", None, error=err, group=group)
    return path


def _write_rank_files(staging: Path, step: int, tree: dict[str, Any],
                      write_tensors: Callable[[Path], FileEntry], rank: int) -> dict[str, FileEntry]:
    st_name, tree_name = data_file_names(rank)
    files = {st_name: write_tensors(staging / st_name)}
    tree_bytes = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode("utf-8")
    files[tree_name] = write_file_durably(staging / tree_name, tree_bytes)
    return files
