"""One rank of a small FSDP2 (``fully_shard``, gloo, CPU) job, for the sharded-state tests.

    python fsdp_child.py SCENARIO LOCAL_DIR OUT [args...]   (RANK, WORLD_SIZE, MASTER_* from the env)

``{rank}`` in LOCAL_DIR gives every rank a directory of its own (hosts that share nothing).

Scenarios:
  save N      train N steps, save step N through the manager (blocking), write the full
              (unsharded) model and optimizer tensors to OUT (rank 0, safetensors)
  restore     build the model with other initial weights, restore, write the full tensors to OUT
  plain       no process group: a plain (unsharded) module and optimizer restore the step
  mismatch    restore into a model of another shape: refused before any live tensor changes
  dcp-save N [async]   train N steps, dcp.save / dcp.async_save through spotckpt.dcp.StorageWriter
  dcp-load    other initial weights, dcp.load through spotckpt.dcp.StorageReader
  dcp-bad     dcp.save where rank 1 alone holds a value JSON cannot store: every rank fails

``WORLD_SIZE`` unset means one process. Prints ``result <json>`` on success.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

import spotckpt


def build(seed: int, *, shard: bool, hidden: int = 13) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 7))
    model.register_buffer("scale", torch.arange(5.0) + seed)
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def full_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor, unsharded (collective under FSDP)."""
    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().contiguous()

    out = {f"model/{k}": full(v) for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            out[f"optim/{i}/{name}"] = full(v)
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int) -> None:
    for s in range(steps):
        g = torch.Generator().manual_seed(1000 * s + rank)
        loss = model(torch.randn(6, 10, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def main() -> int:
    scenario, local_dir, out_path, *rest = sys.argv[1:]
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    else:
        rank = 0
    local_dir = local_dir.replace("{rank}", str(rank))  # one "host" per rank
    kw = {"metrics": False, "keep_last": None, "s3_uri": os.environ.get("S3_URI") or None,
          "collective_timeout_seconds": float(os.environ.get("TIMEOUT", "120"))}
    result: dict[str, object] = {}
    if scenario == "save":
        model, opt = build(0, shard=True)
        n = int(rest[0])
        train(model, opt, n, rank)
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            mgr.save(n, {"model": model, "optim": opt, "epoch": 3}, blocking=rest[1:2] != ["async"])
            mgr.wait()
        result["step"] = n
    elif scenario in ("restore", "plain"):
        model, opt = build(7, shard=scenario == "restore")
        state = {"model": model, "optim": opt, "epoch": 0}
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            result["step"] = mgr.restore(state)
        result["epoch"] = state["epoch"]
    elif scenario == "mismatch":
        model, opt = build(7, shard=distributed, hidden=14)
        before = full_tensors(model, opt)
        try:
            with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
                mgr.restore({"model": model, "optim": opt})
        except spotckpt.SpotCkptError as exc:
            result.update(error=type(exc).__name__, message=str(exc))
        after = full_tensors(model, opt)
        result["untouched"] = all(torch.equal(before[k], after[k]) for k in before if k.startswith("model/"))
    elif scenario == "dcp-bad":
        import torch.distributed.checkpoint as dcp

        from spotckpt.dcp import StorageWriter

        model, opt = build(0, shard=distributed)
        sd: dict[str, object] = {"model": model.state_dict()}
        if rank == 1:
            sd["odd"] = {"fn": print}
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            try:
                dcp.save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=1)
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                result.update(error=type(exc).__name__, message=str(exc)[-600:])
            result["steps"] = mgr.all_steps()
        print("result " + json.dumps(result), flush=True)
        dist.barrier()
        os._exit(0)
    elif scenario in ("dcp-save", "dcp-load"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from spotckpt.dcp import StorageReader, StorageWriter

        model, opt = build(0 if scenario == "dcp-save" else 7, shard=distributed)
        with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
            if scenario == "dcp-save":
                n = int(rest[0])
                train(model, opt, n, rank)
                msd, osd = get_state_dict(model, opt)
                sd = {"model": msd, "optim": osd, "train": {"step": n, "note": "spot"}}
                if rest[1:2] == ["async"]:
                    dcp.async_save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=n).result()
                else:
                    dcp.save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=n)
                mgr.wait()
                result["step"] = n
            else:
                msd, osd = get_state_dict(model, opt)
                sd = {"model": msd, "optim": osd, "train": {"step": 0, "note": ""}}
                reader = StorageReader(mgr)
                dcp.load(sd, storage_reader=reader)
                set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
                result["step"] = reader.loaded_step
                result["train"] = sd["train"]
            result["steps"] = mgr.all_steps()
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    tensors = full_tensors(model, opt)
    if rank == 0:
        save_file(tensors, out_path)
    if scenario in ("restore", "plain", "dcp-load"):
        train(model, opt, 1, rank)  # the restored optimizer steps on
    print("result " + json.dumps(result), flush=True)
    if distributed:
        # gloo can abort the process at teardown after FSDP2's collectives ("terminate called
        # without an active exception", a torch issue), even after a barrier; everything is
        # durable and closed by now, so leave without the finalizers
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
