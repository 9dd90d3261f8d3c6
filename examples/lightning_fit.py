"""PyTorch Lightning made spot-safe with spotckpt: a small regression model on synthetic data.
Stop it with SIGTERM at any moment and start it again -- even on a fresh machine, from S3 -- and
``trainer.fit`` resumes from the checkpoint spotckpt committed.

    spotckpt run -- python examples/lightning_fit.py --local-dir /tmp/ckpt --steps 200
    torchrun --nproc_per_node 2 examples/lightning_fit.py --local-dir /tmp/ckpt    # DDP (gloo on CPU)

The lines that matter are marked "spotckpt". Checkpoints are committed under --local-dir
(default: $SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath or /opt/ml/checkpoints) and uploaded to
--s3-uri / $SPOTCKPT_S3_URI; ModelCheckpoint's dirpath is scratch space next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from spotckpt.data import ResumableDataLoader
from spotckpt.integrations.lightning import SpotckptCallback


def say(line: str) -> None:
    """Print one line with one write: under torchrun every rank shares one pipe, and print()'s
    separate write of the newline (unbuffered, as simulate runs it) lets ranks glue lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_dataset(n: int = 512, dim: int = 16, seed: int = 1234) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x @ torch.randn(dim, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class Regressor(pl.LightningModule):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, 1))
        self.losses: dict[int, float] = {}  # step -> loss, kept in the checkpoint for the report

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(1), y)
        self.losses[self.global_step + 1] = loss.item()
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 20, 0.5),
                                                   "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["losses"] = dict(self.losses)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.losses = {int(k): v for k, v in checkpoint.get("losses", {}).items()}


class Report(pl.Callback):
    """Prints each step's loss (and paces the run with --step-sleep, for demos and tests)."""

    def __init__(self, every: int, sleep: float) -> None:
        self.every, self.sleep = every, sleep

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step % self.every == 0:
            say(f"lightning_fit: step {trainer.global_step} loss {outputs['loss'].item():.5f}")
        if self.sleep:
            time.sleep(self.sleep)


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps (max_steps)")
    p.add_argument("--save-steps", type=int, default=20, help="ModelCheckpoint(every_n_train_steps=...)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (demo pacing)")
    p.add_argument("--print-every", type=int, default=10)
    p.add_argument("--local-dir", default=None)
    p.add_argument("--s3-uri", default=None)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--dirpath", default=None, help="ModelCheckpoint's scratch dirpath (default: next to local_dir)")
    p.add_argument("--report", default=None, help="write the loss of every step and the weights digest here (JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    world, local_world = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1:  # under torchrun: spotckpt needs the process group before resume_path(); Lightning reuses it
        torch.distributed.init_process_group("gloo")
    spot = SpotckptCallback(local_dir=args.local_dir, s3_uri=args.s3_uri, keep_last=args.keep_last)  # spotckpt
    dirpath = Path(args.dirpath or spot.local_dir.parent / f"{spot.local_dir.name}-lightning")
    pl.seed_everything(0, verbose=False)
    model = Regressor()
    # a loader with state_dict/load_state_dict: Lightning saves its position and resumes mid-epoch;
    # with several ranks each reads its shard of one permutation
    loader = ResumableDataLoader(make_dataset(), batch_size=args.batch_size, shuffle=True, seed=7,
                                 num_replicas=world, rank=rank)
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=local_world, num_nodes=world // local_world,
        strategy="ddp" if world > 1 else "auto", use_distributed_sampler=False,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[spot, Report(args.print_every, args.step_sleep),  # spotckpt: the callback and its plugin
                   ModelCheckpoint(dirpath=dirpath, every_n_train_steps=args.save_steps, save_top_k=2,
                                   monitor="step", mode="max")],
        plugins=[spot.checkpoint_io],
    )
    resume = spot.resume_path()
    start = 0 if resume is None else int(Path(resume).parent.name.split("-")[1])  # step-000000000040
    say(f"lightning_fit[{rank}]: starting at step {start} of {args.steps}" if world > 1
        else f"lightning_fit: starting at step {start} of {args.steps}")
    trainer.fit(model, loader, ckpt_path=resume)  # spotckpt: after a preemption, exits 0 here
    digest = weights_digest(model)
    if rank != 0:  # several ranks: rank 0 prints and reports
        return 0
    if args.report:
        Path(args.report).write_text(json.dumps({"losses": model.losses, "weights": digest}))
    loss_digest = hashlib.sha256(repr(sorted(model.losses.items())).encode()).hexdigest()[:16]
    say(f"lightning_fit: done at step {trainer.global_step}; weights {digest}; losses {loss_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
