"""The uploader: keeps ``<s3_uri>`` in step with the committed steps of ``local_dir``.

Events are hints, the scan is the truth. A watchdog ``Observer`` on ``local_dir`` wakes the
upload thread when a committed ``step-*`` directory appears (by atomic rename: a moved or
created directory event); independently, the upload thread reconciles ``local_dir`` against
S3 every ``scan_interval_seconds``. So an inotify overflow, a missed event or a restart never
loses a checkpoint: the uploader keeps no state but what is in S3 and ``local_dir``.

One reconcile pass (upload thread)::

    scan local committed steps, list committed S3 steps
    -> skip local steps that retention (keep_last over local + S3) would delete anyway
    -> upload the newest missing step (data first, manifest last; S3Store.upload_step, which
       finishes the files the save already uploaded while writing them, see remote/s3/early.py)
    -> rescan (a newer step may have been committed meanwhile), until nothing is missing
    -> S3 retention: delete all but the newest keep_last (manifest first, then data)

Threads: ``spotckpt-uploader`` runs passes; ``spotckpt-uploader-watch`` is the watchdog
observer (it only calls :meth:`Uploader.notify`). Any thread may call ``notify``,
``wait_for``, ``flush``, ``uploaded_steps``, ``error``; the owner calls ``start`` and ``close``.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from spotckpt.errors import (
    CheckpointCorruptError,
    ConfigError,
    LocalStepVanishedError,
    SpotCkptError,
    StorageError,
    UploadError,
)
from spotckpt.format import MANIFEST_NAME, step_dirname
from spotckpt.core.local import read_step_manifest, scan_committed_steps
from spotckpt.policy import KeepAll, RetentionPolicy, doomed
from spotckpt.core.protocols import RemoteStore

__all__ = ["Uploader"]

log = logging.getLogger(__name__)

_STEP_DIR_RE = re.compile(r"^step-\d{12}$")
_AWAIT_MANIFEST_SECONDS = 0.5  # several hosts: how often to look for the other hosts' files


class _StopRaceFilter(logging.Filter):
    """Drops the one message watchdog's inotify emitter logs (at ERROR) when it is stopped while
    an event is in flight -- a benign race inside watchdog at every shutdown, which users saw as
    an error. Anything else from watchdog passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "called when the thread is inactive" not in record.getMessage()


_STOP_RACE_FILTER = _StopRaceFilter()


class _Handler(FileSystemEventHandler):
    """watchdog event handler (runs on the observer thread): wake the uploader for step dirs."""

    def __init__(self, uploader: Uploader) -> None:
        super().__init__()
        self._uploader = uploader

    def dispatch(self, event: FileSystemEvent) -> None:
        path = getattr(event, "dest_path", "") or getattr(event, "src_path", "")
        name = Path(str(path)).name
        if event.event_type in ("moved", "created", "closed") and (_STEP_DIR_RE.match(name) or name == MANIFEST_NAME):
            self._uploader.notify()


class Uploader:
    """Uploads committed local steps to a :class:`~spotckpt.core.protocols.RemoteStore` (S3), newest
    first, with retention there.

    ``retention`` (default: keep all) decides which steps S3 keeps; local steps that would fall
    outside it are not uploaded at all.

    Several hosts (``world_size`` > 1; one uploader per host, run by the host's leader rank):
    each uploads the files its ``local_dir`` holds; only the one with ``writes_manifest`` (rank
    0's host) writes ``manifest.json``, after every listed object of every host is in S3 with the
    right size and CRC32C, and applies S3 retention.
    """

    def __init__(
        self,
        local_dir: Path,
        store: RemoteStore,
        *,
        retention: RetentionPolicy | None = None,
        scan_interval_seconds: float = 5.0,
        on_uploaded: Callable[[int, float, int], None] | None = None,
        world_size: int = 1,
        writes_manifest: bool = True,
        await_hosts_seconds: float = 600.0,
    ) -> None:
        """``on_uploaded(step, seconds, bytes)`` is called on the upload thread each time a step's
        manifest lands in S3 (``seconds``: that step's upload, data and manifest)."""
        self.local_dir = Path(local_dir)
        self.store = store
        self.retention = retention if retention is not None else KeepAll()
        self.world_size = world_size
        self.writes_manifest = writes_manifest
        self._data_done: set[int] = set()  # several hosts: steps whose files this host uploaded
        self.await_hosts_seconds = await_hosts_seconds
        self.scan_interval_seconds = scan_interval_seconds
        self._on_uploaded = on_uploaded
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._remote: set[int] = set()  # committed in S3, as of the last listing + our uploads
        self._skipped: set[int] = set()  # superseded locally: retention would delete them anyway
        self._bad: dict[int, SpotCkptError] = {}  # local steps that do not verify: never uploaded
        self._passes = 0  # completed reconcile passes
        self._error: SpotCkptError | None = None
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._upload_lock = threading.Lock()  # held by the upload thread around each step's upload
        self._ceiling: int | None = None  # during roll_back(): steps above it are not uploaded

    # --------------------------------------------------------------------- owner thread

    def start(self) -> None:
        """Start the upload thread and the watchdog observer (call once)."""
        if self._thread is not None:
            raise ConfigError("Uploader.start() called twice; create one Uploader per start")
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="spotckpt-uploader", daemon=True)
        self._thread.start()
        try:
            from watchdog.observers import Observer

            logging.getLogger("watchdog.observers.inotify").addFilter(_STOP_RACE_FILTER)  # idempotent
            obs = Observer()
            obs.name = "spotckpt-uploader-watch"
            obs.daemon = True
            obs.schedule(_Handler(self), str(self.local_dir), recursive=False)
            obs.start()
            self._observer = obs
        except Exception as exc:  # noqa: BLE001 - e.g. inotify watch limit: the scan still works
            log.warning("file watching on %s unavailable (%s); relying on the periodic scan", self.local_dir, exc)

    def close(self, timeout: float | None = None) -> None:
        """Stop watching and join the threads (an upload in flight finishes first, bounded
        by ``timeout``). Does not flush: call :meth:`flush` first for that."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            try:
                self._observer.stop()
                self._observer.join(timeout)
            except Exception:  # noqa: BLE001
                log.debug("watchdog observer did not stop cleanly", exc_info=True)
            self._observer = None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("uploader still busy after %.1fs; an upload may be left incomplete", timeout or 0)
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------------ any thread

    def notify(self, step: int | None = None) -> None:
        """A hint that a step was committed locally: run a reconcile pass soon."""
        self._wake.set()

    @property
    def error(self) -> SpotCkptError | None:
        """The failure of the latest pass (cleared by a later successful pass)."""
        with self._cond:
            return self._error

    def raise_if_failed(self) -> None:
        """Raise the background error (a copy of it, same type, chained to the original)."""
        err = self.error
        if err is not None:
            raise copy.copy(err) from err

    def uploaded_steps(self) -> list[int]:
        """Steps known to be committed in S3 (as of the last pass), ascending."""
        with self._cond:
            return sorted(self._remote)

    def wait_for(self, step: int, timeout: float | None = None) -> bool:
        """Wait until ``step``'s manifest is in S3, or the step was skipped or removed locally
        because a newer one supersedes it. False on timeout; raises the background error if a
        pass fails meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.notify()
        with self._cond:
            start_pass = self._passes
            while True:
                if step in self._remote or step in self._skipped:
                    return True
                if step in self._data_done and any(r > step for r in self._remote):
                    return True  # several hosts: a newer committed step supersedes it
                if step in self._bad:
                    raise copy.copy(self._bad[step]) from self._bad[step]
                if self._passes > start_pass:
                    if self._error is not None:
                        self.raise_if_failed()
                    if self._superseded(step):
                        return True
                if self._stop.is_set() and (self._thread is None or not self._thread.is_alive()):
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every step committed locally right now is in S3 (or skipped), and one
        full pass (so S3 retention too) has completed since the call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            start_pass = self._passes
        for step in reversed(scan_committed_steps(self.local_dir, require_manifest=True)):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.wait_for(step, left):
                return False
        self.notify()
        with self._cond:
            while self._passes <= start_pass:
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 1.0)
            if self._error is not None:
                self.raise_if_failed()
        return True

    def roll_back(self, step: int | None, action: Callable[[], None]) -> None:
        """A restore chose ``step`` (None: none -- a fresh start over damaged steps): steps above
        it will be written again by this job. Stop uploading them (an upload in flight finishes,
        a wait for other hosts' files of such a step ends now), run ``action`` (the caller moves
        them aside locally and un-commits them in S3) while no upload runs, then forget them."""
        ceiling = -1 if step is None else step
        with self._cond:
            self._ceiling = ceiling
            self._cond.notify_all()
        self._wake.set()
        with self._upload_lock:
            try:
                action()
            finally:
                with self._cond:
                    for known in (self._remote, self._skipped, self._data_done):
                        known.difference_update([s for s in known if s > ceiling])
                    for s in [s for s in self._bad if s > ceiling]:
                        del self._bad[s]
                    self._ceiling = None
                    self._cond.notify_all()
        self._wake.set()

    def _above_ceiling(self, step: int) -> bool:
        with self._cond:
            return self._ceiling is not None and step > self._ceiling

    def _superseded(self, step: int) -> bool:
        """Called with the lock held: the step is gone locally and a newer one exists."""
        if (self.local_dir / step_dirname(step)).exists():
            return False
        newer = [s for s in (self._remote | set(scan_committed_steps(self.local_dir, require_manifest=True))) if s > step]
        return bool(newer)

    # ------------------------------------------------------------------- upload thread

    def sync_once(self) -> None:
        """One reconcile pass in the calling thread (for ``spotckpt sync --once``; do not use
        while started). Raises the pass's error."""
        self._pass()
        self.raise_if_failed()

    def _run(self) -> None:
        try:
            self.store.cleanup_incomplete_uploads()
        except SpotCkptError as exc:
            log.warning("could not clean up incomplete multipart uploads: %s", exc)
        while not self._stop.is_set():
            self._pass()
            # several hosts: while this host's data waits for the manifest another host writes,
            # look again soon (wait_for() of the final save is waiting on it)
            with self._cond:
                awaiting = bool(self._data_done - self._remote)
            self._wake.wait(_AWAIT_MANIFEST_SECONDS if awaiting else self.scan_interval_seconds)
            self._wake.clear()

    def _pass(self) -> None:
        err: SpotCkptError | None = None
        try:
            self._reconcile()
        except SpotCkptError as exc:
            err = exc
            log.error("S3 upload pass failed (will retry in %.0fs): %s", self.scan_interval_seconds, exc)
        except Exception as exc:  # noqa: BLE001 - surface anything as a SpotCkptError
            err = StorageError(f"uploader failed unexpectedly: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            log.exception("S3 upload pass failed")
        with self._cond:
            self._error = err
            self._passes += 1
            self._cond.notify_all()

    def _reconcile(self) -> None:
        while not self._stop.is_set():
            local = scan_committed_steps(self.local_dir, require_manifest=True)
            remote = set(self.store.list_steps())
            keep = self.retention.kept(set(local) | remote)
            missing = [s for s in reversed(local)
                       if s not in remote and s in keep and s not in self._bad and s not in self._data_done]
            skipped = [s for s in local if s not in keep and s not in remote]
            with self._cond:
                self._remote = remote
                self._skipped.update(skipped)
                self._cond.notify_all()
            for s in skipped:  # abort what their saves uploaded while writing
                self.store.discard_early(s)
            if not missing or self._above_ceiling(missing[0]):
                break
            with self._upload_lock:
                if not self._above_ceiling(missing[0]):
                    self._upload(missing[0])
        with self._upload_lock:  # never while roll_back() is moving steps
            self._apply_retention()

    def _upload(self, step: int) -> None:
        src = self.local_dir / step_dirname(step)
        try:
            manifest = read_step_manifest(self.local_dir, step)
            t0 = time.perf_counter()
            if self.world_size > 1:
                committed = self._upload_host_part(step, src, manifest)
                if committed is None:
                    return  # waiting for the host that writes the manifest
                uploaded = committed
            else:
                uploaded = self.store.upload_step(step, src, manifest)
        except (LocalStepVanishedError, FileNotFoundError):
            if src.exists():
                raise
            log.info("local step %s was removed during its upload (local retention); dropping it", step)
            self._drop_orphan(step)
            return
        except SpotCkptError as exc:
            if not src.exists():
                log.info("local step %s was removed during its upload; dropping it", step)
                self._drop_orphan(step)
                return
            if isinstance(exc, CheckpointCorruptError):
                # A damaged local step must not block the others (nor ever reach S3).
                log.error("local step %s does not verify and is not uploaded: %s", step, exc)
                self.store.discard_early(step)
                with self._cond:
                    self._bad[step] = exc
                    self._cond.notify_all()
                return
            raise
        if uploaded and self._on_uploaded is not None:  # before wait_for() returns: lines in order
            try:
                self._on_uploaded(step, time.perf_counter() - t0, manifest.total_bytes)
            except Exception:  # noqa: BLE001 - a metrics callback must not stop uploads
                log.exception("on_uploaded callback failed")
        with self._cond:
            self._remote.add(step)
            self._cond.notify_all()

    def _upload_host_part(self, step: int, src: Path, manifest: Any) -> bool | None:
        """Several hosts: upload the files this host holds (data only). The host of rank 0 then
        waits until every file of every host is in S3 with the right size and CRC32C, and only
        then writes the manifest; the others return None (the step commits when that manifest
        appears). A host that died mid-upload leaves the step uncommitted; the writer gives up
        on it once a newer step is committed locally."""
        here = {rel for rel in manifest.files if (src / rel).is_file()}
        if step not in self._data_done:
            self.store.upload_step(step, src, manifest, files=here, commit=False)
            with self._cond:
                self._data_done.add(step)
        if not self.writes_manifest:
            return None
        give_up = time.monotonic() + self.await_hosts_seconds
        while not self._stop.is_set():
            if self._above_ceiling(step):
                log.info("step %s: a restore chose an older step; not committing it", step)
                return None
            missing = self.store.missing_objects(step, manifest)
            if not missing:
                return bool(self.store.commit_manifest(step, manifest))
            if time.monotonic() > give_up:
                with self._cond:
                    self._skipped.add(step)
                raise UploadError(
                    f"step {step}: {', '.join(missing)} did not reach {self.store.uri} from the other hosts "
                    f"within {self.await_hosts_seconds:.0f} s; the step stays uncommitted in S3 (the older "
                    "committed steps are intact) -- check the other hosts' logs",
                    key=missing[0],
                )
            if any(s > step for s in scan_committed_steps(self.local_dir, require_manifest=True)):
                log.warning("step %s: %s never reached S3 from the other hosts; a newer step supersedes it",
                            step, ", ".join(missing))
                with self._cond:
                    self._skipped.add(step)
                return None
            self._stop.wait(_AWAIT_MANIFEST_SECONDS)
        return None

    def _drop_orphan(self, step: int) -> None:
        """Delete data objects a vanished step left behind, unless its manifest made it."""
        self.store.discard_early(step)
        if step in self.store.list_steps():
            with self._cond:
                self._remote.add(step)
            return
        try:
            self.store.delete_step(step)
        except SpotCkptError as exc:
            log.warning("could not delete leftover objects of step %s: %s", step, exc)

    def _apply_retention(self) -> None:
        if isinstance(self.retention, KeepAll) or not self.writes_manifest:
            return  # several hosts: the host that commits steps also retires them, once
        remote = self.store.list_steps()
        gone = doomed(self.retention, remote, protect=remote[-1:])  # never the newest
        for step in gone:
            self.store.delete_step(step)
        if gone:
            with self._cond:
                self._remote.difference_update(gone)
                self._skipped.update(gone)
                self._cond.notify_all()
