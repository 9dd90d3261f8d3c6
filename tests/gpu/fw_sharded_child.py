"""One run of a sharded framework job on CUDA, for test_gpu_frameworks_sharded (started by torchrun,
one process per GPU): ``FRAMEWORK LOCAL_DIR REPORT [STOP_AT]``.

- ``trainer``: the Hugging Face Trainer with FSDP2 (``fsdp=True``, ``fsdp_config`` version 2,
  ``SHARDED_STATE_DICT``: every rank writes its shards of ``pytorch_model_fsdp_0/`` and
  ``optimizer_0/`` with torch.distributed.checkpoint) and SpotckptCallback.
- ``lightning``: Lightning's ``FSDPStrategy(state_dict_type="sharded")`` (a folder of every rank's
  shards and ``meta.pt``, written past ``CheckpointIO``) and SpotckptCallback.

Saves every 3 of 9 steps; ``STOP_AT`` stops training after that step's save (the interrupted
run); otherwise it resumes from the newest committed step (``resume_path()``) and runs to 9.
Rank 0 writes REPORT: the start, every step's loss it ran, the full weights' digest. On CPU the
Trainer silently trains DDP instead (accelerate enables FSDP only for accelerator devices), so
this is a GPU check."""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STEPS = 9
framework, local_dir, report = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
rank = int(os.environ.get("RANK", 0))


def digest(state: dict[str, Any]) -> str:
    """Collective for DTensors: every rank gathers the full tensors."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        h.update(k.encode() + full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def trainer() -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from spotckpt.integrations.transformers import SpotckptCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(1234)
            self.ids = torch.randint(0, 128, (256, 32), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == stop_at:
                control.should_training_stop = True

    spot = SpotckptCallback(local_dir=local_dir, keep_last=None)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(
        output_dir=str(local_dir.parent / f"{local_dir.name}-out"), max_steps=STEPS, save_steps=3,
        per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, report_to=[], seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
        fsdp=True, fsdp_config={"version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                                "transformer_layer_cls_to_wrap": ["GPT2Block"]})
    tr = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[spot, Stop()])
    assert tr.is_fsdp_enabled, "accelerate did not enable FSDP (no accelerator device?)"
    resume = spot.resume_path() if stop_at is None else None
    start = 0 if resume is None else json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    tr.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h and h["step"] > start}
    return {"start": start, "losses": losses, "weights": digest(tr.model_wrapped.state_dict())}


def lightning() -> dict[str, Any]:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import FSDPStrategy

    from spotckpt.data import ResumableDataLoader
    from spotckpt.integrations.lightning import SpotckptCallback

    world = int(os.environ.get("WORLD_SIZE", 1))

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
            self.losses: dict[int, float] = {}

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x).squeeze(1), y)
            self.losses[self.global_step + 1] = loss.item()
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    class Stop(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step == stop_at:
                trainer.should_stop = True

    if world > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl")
    spot = SpotckptCallback(local_dir=local_dir, keep_last=None)
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(256, 16, generator=g)
    loader = ResumableDataLoader(torch.utils.data.TensorDataset(x, x.sum(1)), batch_size=8, shuffle=True, seed=7,
                                 num_replicas=world, rank=rank)
    model = Net()
    tr = pl.Trainer(max_steps=STEPS, accelerator="cuda", devices=world, strategy=FSDPStrategy(state_dict_type="sharded"),
                    use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                    enable_model_summary=False,
                    callbacks=[spot, Stop(), ModelCheckpoint(dirpath=local_dir.parent / f"{local_dir.name}-pl",
                                                             every_n_train_steps=3, save_top_k=-1)],
                    plugins=[spot.checkpoint_io])
    resume = spot.resume_path() if stop_at is None else None
    start = 0 if resume is None else int(re.search(r"step-(\d+)", resume).group(1))  # type: ignore[union-attr]
    tr.fit(model, loader, ckpt_path=resume)
    with _full_state(tr):
        weights = digest(tr.strategy.model.state_dict())
    return {"start": start, "losses": {k: v for k, v in model.losses.items() if k > start}, "weights": weights}


class _full_state:  # noqa: N801 - a context manager: FSDP1's full state dict, gathered on every rank
    def __init__(self, tr: Any) -> None:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        self.ctx = FSDP.state_dict_type(tr.strategy.model, StateDictType.FULL_STATE_DICT,
                                        FullStateDictConfig(offload_to_cpu=True, rank0_only=False))

    def __enter__(self) -> None:
        self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)


def main() -> int:
    out = trainer() if framework == "trainer" else lightning()
    if rank == 0:
        report.write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
