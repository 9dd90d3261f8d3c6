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

``AsyncCheckpointIO`` is not needed: the upload already runs in the background; only the local
copy is on the training thread.

Several ranks (``ddp`` under torchrun or on several hosts; tested on CPU with gloo): call
``torch.distributed.init_process_group()`` before ``resume_path()`` (Lightning reuses the group).
Under ``ddp`` only global rank 0 writes the ``.ckpt`` (through the plugin), so every rank notes
each save (``on_save_checkpoint``) and every rank adopts it at the next hook they all pass (the
next batch's start, the end of training): one step, in S3 once committed on every host.
SIGTERM reaching any one rank makes every rank save the same step (an agreement through the
job's store, no collective per step) and stop; ``fit`` then ends with ``SIGTERMException``
(status 0) from the callback's ``teardown``, after the upload. Lightning's own SIGTERM handler,
which runs a collective from inside the signal handler of the one rank that got the signal, is
replaced by spotckpt's for the run. ``resume_path()`` gives every host the whole ``.ckpt``. The
RNG states in the checkpoint are rank 0's (Lightning writes one file), restored on every rank.
Checkpoints saved with ``weights_only=True`` are not committed with several ranks.

Sharded strategies (``ModelParallelStrategy``, ``FSDPStrategy(state_dict_type="sharded")``) write a
folder of every rank's shards with torch.distributed.checkpoint and never call ``CheckpointIO``:
the callback wraps the strategy's ``save_checkpoint`` in ``setup`` and adopts that folder on every
rank, and ``resume_path()`` returns the step's folder. ``ModelParallelStrategy`` is tested on CPU
(gloo); ``FSDPStrategy`` needs a GPU (tests/gpu).

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
from lightning_fabric.utilities.load import _METADATA_FILENAME

from pytorch_lightning.utilities.exceptions import SIGTERMException

from spotckpt.errors import ConfigError
from spotckpt.events import PreemptedEvent, ProgressEvent
from spotckpt.format import MANIFEST_NAME, Manifest
from spotckpt.manager import CheckpointManager
from spotckpt.integrations import ManagerSlot

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
        step = int(checkpoint["global_step"])
        if self.owner.manager.world_size > 1:  # rank 0 only: every rank adopts it at the next common hook
            self.owner._written[step] = Path(path)
            return
        self.owner.manager.adopt(step, Path(path), meta=_meta(checkpoint))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)  # Lightning's file in dirpath; committed steps stay

    def teardown(self) -> None:
        self.inner.teardown()


def _meta(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {"framework": "lightning", "epoch": int(checkpoint.get("epoch", 0))}


class SpotckptCallback(ManagerSlot, pl.Callback):
    """SIGTERM -> a committed, uploaded checkpoint at the end of the current batch, then stop;
    the RNG states in the checkpoint; ``resume_path()``. Pass ``checkpoint_io`` as a plugin.

    ``manager``: a :class:`~spotckpt.CheckpointManager` to use (kept open); by default one is
    built when first needed from ``local_dir``, ``s3_uri``, ``keep_last`` and
    ``manager_kwargs``, and closed when ``fit`` ends.
    """

    def __init__(self, manager: CheckpointManager | None = None, *, local_dir: str | os.PathLike[str] | None = None,
                 s3_uri: str | None = None, keep_last: int | None = 3, **manager_kwargs: Any) -> None:
        self._set_manager("lightning", manager, local_dir=local_dir, s3_uri=s3_uri, keep_last=keep_last,
                          hint="call torch.distributed.init_process_group() before resume_path() (Lightning reuses "
                               "it)", **manager_kwargs)
        self.checkpoint_io = SpotckptCheckpointIO(self)
        self.preempted = False  # the final step is committed (and uploaded, within the grace)
        self._saving: dict[int, dict[str, Any]] = {}  # several ranks: saves not adopted yet, by step
        self._written: dict[int, Path] = {}  # several ranks, rank 0: the file of each of those saves

    def resume_path(self) -> str | None:
        """The ``.ckpt`` to pass to ``trainer.fit(ckpt_path=...)``: the newest committed step
        that verifies (local, else S3), or None to start fresh."""
        step_dir = self.manager.restore_folder()
        if step_dir is None:
            return None
        man = Manifest.from_bytes((step_dir / MANIFEST_NAME).read_bytes(), source=str(step_dir / MANIFEST_NAME))
        path = step_dir / str(man.extra.get("adopted", ""))
        if len(man.files) == 1 and path.is_file():  # one .ckpt file (ddp, one process, FSDP "full")
            log.info("spotckpt: resuming Lightning from %s", path)
            return str(path)
        if _METADATA_FILENAME in man.files:  # a sharded checkpoint folder: every rank's shards and meta.pt
            log.info("spotckpt: resuming Lightning from the sharded checkpoint %s", step_dir)
            return str(step_dir)
        raise ConfigError(f"{step_dir} is not a Lightning checkpoint adopted by this integration "
                          "(one .ckpt file, or a sharded folder with meta.pt); point local_dir / s3_uri at "
                          "this job's checkpoints")

    # -- Lightning hooks -----------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _filter_lightning_noise()
        if trainer.world_size != self.manager.world_size:
            raise ConfigError(f"Lightning runs {trainer.world_size} processes but torch.distributed has "
                              f"{self.manager.world_size}; start Lightning's ranks with torchrun and call "
                              "torch.distributed.init_process_group() before resume_path()")
        if trainer.strategy.checkpoint_io is not self.checkpoint_io:
            raise ConfigError("pass the callback's plugin too: Trainer(callbacks=[spot], plugins=[spot.checkpoint_io]) "
                              "-- without it Lightning's checkpoints are not committed")
        self._watch_sharded_saves(trainer.strategy)
        root = self.manager.local_dir
        cb = trainer.checkpoint_callback
        dirpath = getattr(cb, "dirpath", None)
        if dirpath and (Path(dirpath).absolute() == root or root in Path(dirpath).absolute().parents):
            raise ConfigError(f"ModelCheckpoint(dirpath={dirpath}) is inside spotckpt's local_dir {root}; "
                              "give Lightning a scratch dirpath outside it")

    def _watch_sharded_saves(self, strategy: Any) -> None:
        """Sharded strategies (``ModelParallelStrategy``, ``FSDPStrategy(state_dict_type="sharded")``)
        write a folder from every rank with torch.distributed.checkpoint and never call
        ``CheckpointIO``: the strategy's ``save_checkpoint`` (collective, the same path on every
        rank) is wrapped so that such a folder is adopted like the plugin's file -- at once with
        one process, at the next common hook on every rank with several. A file save passes
        through unchanged (the plugin commits it)."""
        save = strategy.save_checkpoint
        if getattr(save, "_spotckpt_owner", None) is self:
            return

        def save_checkpoint(checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
            step, meta = int(checkpoint["global_step"]), _meta(checkpoint)
            save(checkpoint, filepath, storage_options=storage_options)
            path = Path(filepath)
            if not path.is_dir():
                return
            if self.manager.world_size > 1:  # every rank wrote its shards: every rank adopts the folder
                self._written[step] = path
            else:
                self.manager.adopt(step, path, meta=meta)

        save_checkpoint._spotckpt_owner = self  # type: ignore[attr-defined]
        strategy.save_checkpoint = save_checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.manager.world_size > 1:  # Lightning registered its SIGTERM handler just before this hook
            self.manager.watcher.take_over()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.manager.world_size > 1:  # every rank: a save whose file rank 0 is about to write
            self._saving.setdefault(int(checkpoint["global_step"]), _meta(checkpoint))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._adopt_saved()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adopt_saved()

    def _adopt_saved(self) -> None:
        """Several ranks: adopt, on every rank, the saves Lightning made since the last call."""
        while self._saving:
            step = min(self._saving)
            meta = self._saving.pop(step)
            self.manager.adopt(step, self._written.pop(step, None), meta=meta)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mgr = self.manager
        mgr.events.emit(ProgressEvent(step=trainer.global_step))
        if not self.preempted and mgr.preemption_due(trainer.global_step):  # several ranks: the agreed step
            self._final_save(trainer)
            trainer.should_stop = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning's SIGTERM handling raises SIGTERMException at the end of a batch or during
        # validation; the step may have been saved by ModelCheckpoint meanwhile, or not at all
        mgr = self._manager
        if mgr is None:  # closed already (several ranks: teardown ends a preempted fit this way)
            return
        # several ranks: the other ranks may be anywhere -- no collective on the way out
        if mgr.world_size == 1 and mgr.preemption_requested and not self.preempted:
            try:
                self._final_save(trainer)
            except Exception as exc:  # noqa: BLE001 - the original exception is what fit raises
                log.error("spotckpt: the final checkpoint could not be saved: %s", exc)
        self._finish(failed=not self.preempted)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        several = self._manager is not None and self._manager.world_size > 1
        self._finish()
        if several and self.preempted:  # as Lightning ends fit after a SIGTERM on one process
            raise SIGTERMException()

    def _final_save(self, trainer: pl.Trainer) -> None:
        mgr = self.manager
        step = trainer.global_step
        mgr.events.emit(PreemptedEvent(step=step, reason=mgr.watcher.reason or "requested"))
        several = mgr.world_size > 1
        if several or not mgr.local.is_committed(step):  # several: adopt skips a committed step on every rank
            cb = trainer.checkpoint_callback
            d = Path(getattr(cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
            trainer.save_checkpoint(d / f"preempted-step={step}.ckpt")
            self._adopt_saved()
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
