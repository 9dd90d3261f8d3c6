"""Hugging Face ``Trainer``: spot-safe training in two lines.

::

    from spotckpt.integrations.transformers import SpotckptCallback

    spot = SpotckptCallback()            # a CheckpointManager from $SPOTCKPT_* / SageMaker's config
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[spot])
    trainer.train(resume_from_checkpoint=spot.resume_path())

What it does, with ``spotckpt run`` as the entrypoint (it forwards SIGTERM to the trainer):

- **SIGTERM** (or the EC2 spot notice): at the end of the current optimizer step the callback
  asks the Trainer to save and stop (``control.should_save`` / ``should_training_stop``); the
  ``checkpoint-N`` folder the Trainer writes is committed (CRC32C, atomic rename) and uploaded
  before the grace period ends; then ``train()`` raises ``SystemExit(0)`` from ``on_train_end``
  (``exit_on_preemption=False`` returns normally instead: check ``spot.preempted``).
- **Periodic saves** (``save_steps``/``save_strategy``) are committed and uploaded the same way,
  the upload in the background.
- **Resume**: ``resume_path()`` is the newest committed step that verifies, local or downloaded
  from S3 on a fresh machine; the Trainer loads its own files from there (spotckpt never
  unpickles them). A ``checkpoint-N`` that a crash left half-written in ``output_dir`` is never
  chosen: only committed steps count, and ``output_dir`` is scratch.
- **Retention**: ``args.output_dir`` is the Trainer's scratch space, ``save_total_limit`` prunes
  only it; spotckpt's ``keep_last`` governs the committed steps (local and S3). Deleting a
  ``checkpoint-N`` never touches a committed step, which is a copy.
- A SIGTERM during the Trainer's own save lets that save finish (the handler only sets a
  flag), then commits it as the final step (its ``event=preempted`` line comes first, as for a
  SIGTERM between saves); a kill in the middle of it leaves the previous committed step as the
  resume point.
- Output: transformers' "Writing model shards" progress bar is switched off around the saves
  the Trainer makes (one bar per save, even with ``disable_tqdm``, is noise in a training log);
  its setting is put back after each save.

Several ranks (torchrun, ``accelerate launch``, several hosts; DDP tested on CPU with gloo):
the same two lines on every rank, with ``resume_path()`` called after the ``Trainer`` (or its
``TrainingArguments``) is built, which starts torch.distributed. SIGTERM reaching any one rank
makes every rank save the same step (an agreement through the job's store, no collective per
step), every rank adopts its part of ``checkpoint-N`` (the main process's model, optimizer and
state, every process's ``rng_state_<i>.pth``; each host's share when hosts do not share a
filesystem) as one step with one manifest, and ``resume_path()`` agrees on the step and gives
every host the whole folder (from S3, or from the other hosts).
Leave ``enable_jit_checkpoint`` off: this callback does what it does, with a commit order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging as hf_logging

from spotckpt.errors import ConfigError, FolderChangedError
from spotckpt.events import PreemptedEvent, ProgressEvent
from spotckpt.manager import CheckpointManager
from spotckpt.integrations import ManagerSlot

__all__ = ["SpotckptCallback", "INCOMPLETE_SENTINEL"]

log = logging.getLogger(__name__)

#: transformers' JIT checkpoint writes this file into a ``checkpoint-N`` while it saves.
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"


class SpotckptCallback(ManagerSlot, TrainerCallback):
    """Commits every ``checkpoint-N`` the Trainer writes, turns SIGTERM into a final save and
    a clean stop, and finds the checkpoint to resume from.

    ``manager``: a :class:`~spotckpt.CheckpointManager` to use (kept open); by default one is
    built when first needed from ``local_dir``, ``s3_uri``, ``keep_last`` and
    ``manager_kwargs`` (the same defaults as the manager's: ``$SPOTCKPT_LOCAL_DIR``, SageMaker's
    ``LocalPath``, ``$SPOTCKPT_S3_URI``), and closed at the end of training.
    """

    def __init__(self, manager: CheckpointManager | None = None, *, local_dir: str | os.PathLike[str] | None = None,
                 s3_uri: str | None = None, keep_last: int | None = 3, exit_on_preemption: bool = True,
                 **manager_kwargs: Any) -> None:
        self._set_manager("transformers", manager, local_dir=local_dir, s3_uri=s3_uri, keep_last=keep_last,
                          hint="build the Trainer (its TrainingArguments start torch.distributed) before calling "
                               "resume_path()", **manager_kwargs)
        self.exit_on_preemption = exit_on_preemption
        self.preempted = False  # the final step is committed (and uploaded, within the grace)
        self._stopping = False
        self._announced = False  # its preempted event is out
        self._bar_off = False  # the shards bar is switched off for the save under way

    def resume_path(self) -> str | None:
        """The folder to pass to ``trainer.train(resume_from_checkpoint=...)``: the newest
        committed checkpoint that verifies (local, else S3), or None to start fresh."""
        path = self.manager.restore_folder()
        if path is None:
            return None
        log.info("spotckpt: resuming the Trainer from %s", path)
        return str(path)

    # -- Trainer hooks -------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if getattr(args, "enable_jit_checkpoint", False):
            raise ConfigError("turn off TrainingArguments.enable_jit_checkpoint: SpotckptCallback saves on "
                              "SIGTERM itself, and both would handle the signal")
        out = Path(args.output_dir).absolute()
        root = self.manager.local_dir
        if out == root or root in out.parents:
            raise ConfigError(f"output_dir {out} is inside spotckpt's local_dir {root}: the Trainer writes "
                              "there in place; give it a scratch output_dir outside local_dir")
        self._stopping = False
        self._announced = False

    def _announce(self, step: int) -> None:
        """The ``preempted`` event, once: at the first hook that sees the SIGTERM."""
        if not self._announced:
            self._announced = True
            mgr = self.manager
            mgr.events.emit(PreemptedEvent(step=step, reason=mgr.watcher.reason or "requested"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        mgr = self.manager
        mgr.events.emit(ProgressEvent(step=state.global_step))
        if not self._stopping and mgr.preemption_due(state.global_step):  # several ranks: the agreed step
            self._stopping = True
            self._announce(state.global_step)
            control.should_save = True
            control.should_training_stop = True
        self._quiet_save(control)
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> TrainerControl:
        self._quiet_save(control)  # save_strategy="epoch"
        return control

    def _quiet_save(self, control: TrainerControl) -> None:
        """The Trainer saves right after this hook: no shards bar for it (on_save puts it back)."""
        if control.should_save and not self._bar_off and hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            self._bar_off = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> TrainerControl:
        if self._bar_off:
            self._bar_off = False
            hf_logging.enable_progress_bar()
        mgr = self.manager
        several = mgr.world_size > 1
        if not args.should_save and not several:
            return control
        step = state.global_step
        if mgr.preemption_requested and not several:  # a SIGTERM during the Trainer's own save: the final step
            self._announce(step)
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        if not several and (folder / INCOMPLETE_SENTINEL).exists():
            log.warning("spotckpt: %s is marked incomplete; not committing it", folder)
        else:
            try:
                mgr.adopt(step, folder, meta={"framework": "transformers"})
            except FolderChangedError as exc:  # the previous committed step stays the resume point
                log.warning("spotckpt: %s", exc)
        # several ranks stop at the agreed step only; one process also after a SIGTERM that
        # arrived during this (periodic) save
        if self._stopping or (not several and mgr.preemption_requested):
            control.should_training_stop = True
            self._stopping = True
            ok = mgr.wait(timeout=mgr.watcher.seconds_left())
            if not ok:
                log.warning("spotckpt: step %d is committed locally but did not reach %s before the deadline",
                            step, mgr.s3_uri)
            self.preempted = mgr.local.is_committed(step)
            log.warning("spotckpt: preempted at step %d; its checkpoint is committed, stopping", step)
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._bar_off:  # a save announced but never made
            self._bar_off = False
            hf_logging.enable_progress_bar()
        mgr = self.manager
        left = mgr.watcher.seconds_left()  # None unless preempted: then never past the grace
        mgr.wait(timeout=left)  # the periodic saves' uploads
        if self._owns:
            mgr.close(timeout=left)
            self._manager = None
        if self.preempted and self.exit_on_preemption:
            raise SystemExit(0)
