"""One rank of a 2-rank Lightning job under ``ModelParallelStrategy`` (FSDP2 ``fully_shard`` on a
1-D data-parallel mesh, gloo, CPU), for test_ranks_frameworks. Lightning writes each checkpoint
as a folder -- every rank's ``__<r>_0.distcp``, rank 0's ``.metadata`` and ``meta.pt`` -- with
torch.distributed.checkpoint, bypassing ``CheckpointIO``. In one process, three runs: an
interrupted one (SIGTERM to rank 1 only, at step 5; periodic saves every 3 steps) on hosts
``a<r>`` with S3; a resumed one on fresh hosts ``b<r>`` from S3; an uninterrupted one. Prints
``result <json>``: each run's start, the loss of every step it ran, the full weights' digest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from spotckpt.data import ResumableDataLoader
from spotckpt.integrations.lightning import SpotckptCallback

STEPS = 10
dist.init_process_group("gloo")  # Lightning reuses it; spotckpt needs it before resume_path()
rank = dist.get_rank()
logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class Sharded(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.losses: dict[int, float] = {}  # this run's steps only (not in the checkpoint)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).squeeze(1), y)
        self.losses[self.global_step + 1] = loss.item()
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=3e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 4, 0.5),
                                                   "interval": "step"}}


class SigtermAt(pl.Callback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == self.step and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only


def run(host: Path, s3_uri: str | None, sigterm_at: int | None = None) -> dict[str, Any]:
    spot = SpotckptCallback(local_dir=host, s3_uri=s3_uri, keep_last=None, metrics=False)
    torch.manual_seed(0)
    model = Sharded()
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 16, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1) + 0.1 * torch.randn(256, generator=g))
    loader = ResumableDataLoader(ds, batch_size=8, shuffle=True, seed=7, num_replicas=2, rank=rank)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                                                       tensor_parallel_size=1),
        use_distributed_sampler=False, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SigtermAt(sigterm_at), spot,
                   ModelCheckpoint(dirpath=host.parent / f"{host.name}-lightning", every_n_train_steps=3,
                                   save_top_k=-1)],
        plugins=[spot.checkpoint_io])
    resume = spot.resume_path()
    start = 0 if resume is None else int(Path(resume).name.split("-")[1])  # step-000000000006
    try:
        trainer.fit(model, loader, ckpt_path=resume)
    except SystemExit as exc:  # the preempted run ends fit with SIGTERMException (status 0)
        assert exc.code in (0, None), exc
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):  # collective: every rank gathers the full tensors
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        h.update(k.encode() + full.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"start": start, "losses": model.losses, "weights": h.hexdigest()[:16], "preempted": spot.preempted,
            "resume": resume}


def main() -> int:
    work, uri = Path(sys.argv[1]), sys.argv[2]
    out = {"a": run(work / f"a{rank}", uri, sigterm_at=5), "b": run(work / f"b{rank}", uri),
           "ref": run(work / f"ref{rank}", None)}
    print("result " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
