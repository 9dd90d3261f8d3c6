"""Sharded state on one GPU, side by side in one run: the async save stall of an FSDP2 module and
its optimizer (a world of one: NCCL for CUDA, gloo for spotckpt and DCP's CPU side) against the
copy floor and DCP ``async_save``.

    python benchmarks/gpu_sharded.py [--gib 2] [--saves 5] [--out benchmarks/out-gpu/sharded.json]

Rows (medians of ``--saves``, after one warm-up save each):
- floor: every local shard (model and optimizer state) copied into one reused pinned host buffer
  with non-blocking copies, then one synchronize -- what "one copy of the rank's shards" costs;
- spotckpt: ``mgr.save(step, {"model": m, "optim": o})`` (async; the stager's pinned buffers
  are reused across saves), waited for between saves, untimed;
- DCP async_save: the time ``dcp.async_save`` blocks (its default stager), ``.result()`` untimed.
Without CUDA it runs the same rows on the CPU with a small state, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="model parameters in GiB (bf16); optimizer state is 2x")
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "out-gpu" / "sharded.json"))
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    import spotckpt

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gib = args.gib if cuda else min(args.gib, 0.03)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=0, world_size=1)
    dtype = torch.bfloat16 if cuda else torch.float32
    width = 4096 if cuda else 512
    layers = max(1, int(gib * 2**30 / (width * width * torch.empty((), dtype=dtype).element_size())))
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device, dtype)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device, dtype=dtype)).sum().backward()
    optim.step()
    state = {"model": model, "optim": optim}

    def shards() -> list[torch.Tensor]:
        out = [v.to_local() for v in model.state_dict().values()]
        for st in optim.state_dict()["state"].values():
            out += [v.to_local() for v in st.values() if hasattr(v, "to_local")]
        return out

    total = sum(t.numel() * t.element_size() for t in shards())
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=cuda)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def floor() -> float:
        sync()
        t0 = time.perf_counter()
        off = 0
        for t in shards():
            n = t.numel() * t.element_size()
            buf[off:off + n].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            off += n
        sync()
        return time.perf_counter() - t0

    rows: dict[str, list[float]] = {"floor": [], "spotckpt": [], "dcp_async_save": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("DIR")) as d:
        with spotckpt.CheckpointManager(Path(d) / "spot", metrics=False, keep_last=1,
                                        install_signal_handlers=False) as mgr:
            for i in range(args.saves + 1):
                gc.collect()
                rows["floor"].append(floor())
                gc.collect()
                sync()
                t0 = time.perf_counter()
                mgr.save(i + 1, state)
                rows["spotckpt"].append(time.perf_counter() - t0)
                mgr.wait()
                msd, osd = get_state_dict(model, optim)
                gc.collect()
                sync()
                t0 = time.perf_counter()
                fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(Path(d) / f"dcp-{i}"))
                rows["dcp_async_save"].append(time.perf_counter() - t0)
                fut.result()
    dist.destroy_process_group()
    med = {k: statistics.median(v[1:]) for k, v in rows.items()}
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (script check)",
        "torch": torch.__version__, "bytes_per_rank": total, "saves": args.saves,
        "median_s": med,
        "spotckpt_over_floor": med["spotckpt"] / med["floor"],
        "spotckpt_over_dcp_async_save": med["spotckpt"] / med["dcp_async_save"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
