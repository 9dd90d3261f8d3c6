"""Hugging Face Accelerate loops (``accelerator.save_state`` / ``load_state``): spot-safe in a few lines.

::

    from spotckpt.integrations.accelerate import AccelerateCheckpoints

    accelerator = Accelerator()
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    spot = AccelerateCheckpoints(accelerator, every_steps=100)   # local_dir / s3_uri as for the manager
    start = spot.restore() or 0                                  # accelerator.load_state of the newest step
    for step in range(start, total_steps):
        train_one_step()
        if spot.maybe_save(step + 1):                            # True after the preemption save: stop
            break
    spot.close()

``accelerator.save_state(dir)`` writes where it always does (a scratch folder next to
``local_dir``: the model, optimizer and scheduler from the main process, every process's
``random_states_<i>.pkl``); every rank then adopts its host's share as one step (CRC32C, one
manifest, atomic rename on every host, S3 once every host's files are there). ``restore()`` agrees
on the step every rank can load, brings it whole to every host (local, S3, or the other hosts) and
calls ``accelerator.load_state`` on it; spotckpt never unpickles the files itself. SIGTERM (or the
spot notice) reaching any rank makes every rank save the same step (``maybe_save`` returns True on
every rank there), upload it within the grace, and stop. Data order is the loop's: restore the
loader's position (e.g. ``accelerator.skip_first_batches`` or a stateful loader registered with
``accelerator.register_for_checkpointing``). Every rank constructs this after the ``Accelerator``
(which starts torch.distributed) and calls the same methods in the same order.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from spotckpt.events import PreemptedEvent, ProgressEvent
from spotckpt.format import parse_step_dirname
from spotckpt.manager import CheckpointManager
from spotckpt.integrations import ManagerSlot

__all__ = ["AccelerateCheckpoints"]

log = logging.getLogger(__name__)


class AccelerateCheckpoints(ManagerSlot):
    """Commits ``accelerator.save_state`` folders as steps, and loads the newest one back.

    ``every_steps``: the periodic save in :meth:`maybe_save` (None: only the preemption save and
    explicit :meth:`save` calls). ``scratch_dir``: where ``save_state`` writes (default: next to
    ``local_dir``; only the newest folder is kept there). ``manager`` / ``local_dir`` /
    ``s3_uri`` / ``keep_last`` / ``manager_kwargs``: as for the other integrations."""

    def __init__(self, accelerator: Any, *, every_steps: int | None = None, manager: CheckpointManager | None = None,
                 local_dir: str | os.PathLike[str] | None = None, s3_uri: str | None = None,
                 keep_last: int | None = 3, scratch_dir: str | os.PathLike[str] | None = None,
                 **manager_kwargs: Any) -> None:
        self._set_manager("accelerate", manager, local_dir=local_dir, s3_uri=s3_uri, keep_last=keep_last,
                          hint="build the Accelerator (it starts torch.distributed) first", **manager_kwargs)
        self.accelerator = accelerator
        self.every_steps = every_steps
        self.scratch_dir = Path(scratch_dir) if scratch_dir is not None else \
            self.local_dir.parent / f"{self.local_dir.name}-accelerate"
        self.preempted = False  # the final step is committed (and uploaded, within the grace)
        self._last: int | None = None

    def restore(self) -> int | None:
        """Load the newest committed step every rank can load (local, else S3) with
        ``accelerator.load_state``; the step, or None to start fresh. Collective."""
        path = self.manager.restore_folder()
        if path is None:
            return None
        self.accelerator.load_state(str(path))
        step = parse_step_dirname(path.name)
        assert step is not None
        self._last = step
        log.info("spotckpt: resumed Accelerate from %s", path)
        return self._last

    def save(self, step: int, *, blocking: bool = True) -> Path:
        """``accelerator.save_state`` into the scratch folder, then commit it as ``step`` on
        every rank (the upload runs in the background). Collective."""
        folder = self.scratch_dir / f"checkpoint-{step}"
        self.accelerator.save_state(str(folder))
        path = self.manager.adopt(step, folder, meta={"framework": "accelerate"}, blocking=blocking)
        if self._last is not None and self._last != step:  # scratch: keep only the newest folder
            shutil.rmtree(self.scratch_dir / f"checkpoint-{self._last}", ignore_errors=True)
        self._last = step
        return path

    def maybe_save(self, step: int) -> bool:
        """Call on every rank after every step. Saves every ``every_steps``; on a preemption
        noticed on any rank, saves the agreed step on every rank, waits for its upload within
        the grace and returns True (then leave the loop: the step is durable)."""
        mgr = self.manager
        mgr.events.emit(ProgressEvent(step=step))
        if self.preempted:
            return True
        if mgr.preemption_due(step):
            mgr.events.emit(PreemptedEvent(step=step, reason=mgr.watcher.reason or "requested"))
            if self._last != step:
                self.save(step)
            if not mgr.wait(timeout=mgr.watcher.seconds_left()):
                log.warning("spotckpt: step %d is committed locally but did not reach %s before the deadline",
                            step, mgr.s3_uri)
            self.preempted = mgr.local.is_committed(step)
            log.warning("spotckpt: preempted at step %d; its checkpoint is committed, stopping", step)
            return True
        if self.every_steps and step % self.every_steps == 0 and self._last != step:
            self.save(step)
        return False

    def close(self) -> None:
        """Wait for the uploads (within the grace after a preemption) and close an owned
        manager. Collective."""
        mgr = self._manager
        if mgr is None:
            return
        left = mgr.watcher.seconds_left()
        mgr.wait(timeout=left)
        if self._owns:
            mgr.close(timeout=left)
            self._manager = None

    def __enter__(self) -> AccelerateCheckpoints:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            self.close()
        elif self._manager is not None and self._owns:
            self._manager.__exit__(exc_type, exc, tb)  # no collective on the way out
            self._manager = None
