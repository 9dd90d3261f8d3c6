"""PyTorch Lightning: spot-safe ``Trainer.fit`` in two lines.

::

    from spotckpt.integrations.lightning import SpotckptCallback

    spot = SpotckptCallback()            # a CheckpointManager from $SPOTCKPT_* / SageMaker's config
    trainer = Trainer(callbacks=[spot, ModelCheckpoint(every_n_train_steps=50)], plugins=[spot.checkpoint_io])
    trainer.fit(model, datamodule=dm, ckpt_path=spot.resume_path())

Two pieces, because Lightning has two seams and each does one job:

- :class:`SpotckptCheckpointIO` (the ``plugins=`` entry) is where every checkpoint Lightning
  writes passes -- ``ModelCheckpoint``'s, ``trainer.save_checkpoint``'s, the preemption save.
  It writes the file where Lightning asks (through ``TorchCheckpointIO``, so the files and
  ``ModelCheckpoint``'s bookkeeping stay what Lightning users know), then commits it as step
  ``global_step`` (a copy with CRC32C, atomic rename, retention, S3 upload in the background).
  A ``Callback`` could not do this: ``on_save_checkpoint`` runs *before* the file is written, and
  ``ModelCheckpoint`` runs after every other callback.
- :class:`SpotckptCallback` (the ``callbacks=`` entry) turns SIGTERM into a save at the end of
  the current training batch, waits for its upload within the grace period, and stops;
  Lightning's own SIGTERM handling then ends ``fit`` with ``SIGTERMException`` (a ``SystemExit``
  with status 0). ``resume_path()`` is the newest committed ``.ckpt`` that verifies (local, else
  S3) -- never a file left half-written in ``dirpath`` -- and Lightning loads it itself.

Retention: ``ModelCheckpoint``'s ``save_top_k`` and ``remove_checkpoint`` act on its
``dirpath`` (scratch) only; spotckpt's ``keep_last`` governs the committed steps. Lightning
saves no RNG state by default, so the callback's own ``state_dict`` carries torch's, numpy's and
Python's generators (as tensors and plain values, so Lightning's ``weights_only`` load accepts
them) and restores them on resume.

One process only (``WORLD_SIZE`` > 1 is refused). ``AsyncCheckpointIO`` is not needed: the
upload already runs in the background; only the local copy is on the training thread.

Output: once the callback is set up, two Lightning warnings that only confuse are filtered, by
message and module: ``ModelCheckpoint``'s "The dirpath has changed" on a resume (its ``dirpath``
is scratch, per machine: a fresh instance has a new one, and its top-k bookkeeping starts over
there by design) and the ``LeafSpec`` deprecation Lightning's own pytree helper triggers in
PyTorch. Every other warning stays.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..errors import ConfigError
from ..events import PreemptedEvent, ProgressEvent
from ..format import MANIFEST_NAME, Manifest
from ..manager import CheckpointManager
from . import ManagerSlot, refuse_several_ranks

__all__ = ["SpotckptCallback", "SpotckptCheckpointIO"]

log = logging.getLogger(__name__)


def _filter_lightning_noise() -> None:
    """The two warnings the module docstring names; each filter is added once."""
    warnings.filterwarnings("ignore", message=r"The dirpath has changed from ", category=UserWarning,
                            module=r"pytorch_lightning\.callbacks\.model_checkpoint")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")


class SpotckptCheckpointIO(CheckpointIO):
    """Writes each checkpoint with ``inner`` (default ``TorchCheckpointIO``) where Lightning
    asks, then commits it through ``owner``'s manager as step ``checkpoint["global_step"]``.
    Loading and removing are ``inner``'s: spotckpt never unpickles the file."""

    def __init__(self, owner: SpotckptCallback, inner: CheckpointIO | None = None) -> None:
        self.owner = owner
        self.inner = inner if inner is not None else TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.owner.manager.adopt(int(checkpoint["global_step"]), Path(path),
                                 meta={"framework": "lightning", "epoch": int(checkpoint.get("epoch", 0))})

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)  # Lightning's file in dirpath; committed steps stay

    def teardown(self) -> None:
        self.inner.teardown()


class SpotckptCallback(ManagerSlot, pl.Callback):
    """SIGTERM -> a committed, uploaded checkpoint at the end of the current batch, then stop;
    the RNG states in the checkpoint; ``resume_path()``. Pass ``checkpoint_io`` as a plugin.

    ``manager``: a :class:`~spotckpt.CheckpointManager` to use (kept open); by default one is
    built when first needed from ``local_dir``, ``s3_uri``, ``keep_last`` and
    ``manager_kwargs``, and closed when ``fit`` ends.
    """

    def __init__(self, manager: CheckpointManager | None = None, *, local_dir: str | os.PathLike[str] | None = None,
                 s3_uri: str | None = None, keep_last: int | None = 3, **manager_kwargs: Any) -> None:
        self._set_manager("lightning", manager, local_dir=local_dir, s3_uri=s3_uri, keep_last=keep_last, **manager_kwargs)
        self.checkpoint_io = SpotckptCheckpointIO(self)
        self.preempted = False  # the final step is committed (and uploaded, within the grace)

    def resume_path(self) -> str | None:
        """The ``.ckpt`` to pass to ``trainer.fit(ckpt_path=...)``: the newest committed step
        that verifies (local, else S3), or None to start fresh."""
        step_dir = self.manager.restore_folder()
        if step_dir is None:
            return None
        man = Manifest.from_bytes((step_dir / MANIFEST_NAME).read_bytes(), source=str(step_dir / MANIFEST_NAME))
        path = step_dir / str(man.extra.get("adopted", ""))
        if not path.is_file() or len(man.files) != 1:
            raise ConfigError(f"{step_dir} is not a Lightning checkpoint adopted by this integration "
                              "(one .ckpt file); point local_dir / s3_uri at this job's checkpoints")
        log.info("spotckpt: resuming Lightning from %s", path)
        return str(path)

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _filter_lightning_noise()
        if trainer.world_size > 1:
            refuse_several_ranks("lightning")  # the environment said 1; Lightning says more
            raise ConfigError(f"spotckpt's lightning integration supports one process; world_size={trainer.world_size}")
        if trainer.strategy.checkpoint_io is not self.checkpoint_io:
            raise ConfigError("pass the callback's plugin too: Trainer(callbacks=[spot], plugins=[spot.checkpoint_io]) "
                              "-- without it Lightning's checkpoints are not committed")
        root = self.manager.local_dir
        cb = trainer.checkpoint_callback
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and (Path(dirpath).absolute() == root or root in Path(dirpath).absolute().parents):
            raise ConfigError(f"ModelCheckpoint(dirpath={dirpath}) is inside spotckpt's local_dir {root}; "
                              "give Lightning a scratch dirpath outside it")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mgr = self.manager
        mgr.events.emit(ProgressEvent(step=trainer.global_step))
        if mgr.preemption_requested and not self.preempted:
            self._final_save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning's SIGTERM handling raises SIGTERMException at the end of a batch or during
        # validation; the step may have been saved by ModelCheckpoint meanwhile, or not at all
        mgr = self.manager
        if mgr.preemption_requested and not self.preempted:
            try:
                self._final_save(trainer)
            except Exception as exc:  # noqa: BLE001 - the original exception is what fit raises
                log.error("spotckpt: the final checkpoint could not be saved: %s", exc)
        self._finish(failed=not self.preempted)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._finish()

    def _final_save(self, trainer: pl.Trainer) -> None:
        mgr = self.manager
        step = trainer.global_step
        mgr.events.emit(PreemptedEvent(step=step, reason=mgr.watcher.reason or "requested"))
        if not mgr.local.is_committed(step):
            cb = trainer.checkpoint_callback
            d = Path(getattr(cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
            trainer.save_checkpoint(d / f"preempted-step={step}.ckpt")
        if not mgr.wait(timeout=mgr.watcher.seconds_left()):
            log.warning("spotckpt: step %d is committed locally but did not reach %s before the deadline",
                        step, mgr.s3_uri)
        self.preempted = mgr.local.is_committed(step)
        log.warning("spotckpt: preempted at step %d; its checkpoint is committed, stopping", step)

    def _finish(self, *, failed: bool = False) -> None:
        """End of fit: uploads flushed (within the grace after a preemption) and an owned manager
        closed. After a failure nothing waits for S3: committed steps are safe locally and the
        next run's uploader or restore picks them up."""
        mgr = self._manager
        if mgr is None:
            return
        if failed and self._owns:
            mgr.__exit__(RuntimeError, RuntimeError("fit failed"), None)  # closes without waiting
        left = mgr.watcher.seconds_left()  # None unless preempted: then never past the grace
        if not failed:
            mgr.wait(timeout=left)
        if self._owns:
            mgr.close(timeout=left)
            self._manager = None

    # -- the RNG states, saved in Lightning's checkpoint and restored from it -------------------
    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
                "python": [version, list(internal), gauss]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        kind, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
