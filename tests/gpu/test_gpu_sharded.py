"""Sharded state on a GPU: an FSDP2 module and its optimizer on CUDA (a world of one, NCCL for
CUDA, gloo for spotckpt) go through pinned staging, restore in place on the device, and
reshard onto a plain CPU module. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spotckpt import CheckpointManager

pytestmark = pytest.mark.gpu


def _fsdp(device: str, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 64, device=device)).sum().backward()
    opt.step()
    return model, opt


def run_sharded_round_trip(tmp_path: Path, device: str) -> None:
    """The test body; ``device="cpu"`` runs it without a GPU (a check of the test itself)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model, opt = _fsdp(device, 0)
        want = {k: v.full_tensor().cpu().clone() for k, v in model.state_dict().items()}
        with CheckpointManager(tmp_path, metrics=False, install_signal_handlers=False) as mgr:
            mgr.save(1, {"model": model, "optim": opt})  # async: one copy of the shards
            if device == "cuda":
                assert mgr.pipeline.stager._buf is not None and mgr.pipeline.stager._buf.is_pinned()
            mgr.wait()
        fresh, fresh_opt = _fsdp(device, 1)
        with CheckpointManager(tmp_path, metrics=False, install_signal_handlers=False) as mgr:
            assert mgr.restore({"model": fresh, "optim": fresh_opt}) == 1
        for k, v in fresh.state_dict().items():
            assert v.device.type == device and torch.equal(v.full_tensor().cpu(), want[k]), k
    finally:
        dist.destroy_process_group()
    plain = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 8))
    with CheckpointManager(tmp_path, metrics=False, install_signal_handlers=False) as mgr:
        assert mgr.restore({"model": plain}) == 1  # FSDP on GPU -> a plain CPU module
    for k, v in plain.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_fsdp_on_cuda_round_trips_through_pinned_staging_and_onto_a_plain_cpu_module(tmp_path: Path) -> None:
    run_sharded_round_trip(tmp_path, "cuda")
