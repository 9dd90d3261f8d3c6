"""One rank of a 2-rank gloo job (CPU) checking that spotckpt.dcp behaves like DCP's own storage.

    python dcp_child.py parity LOCAL_DIR OUT    (RANK, WORLD_SIZE, MASTER_* from the env; OUT unused)

One job, several checks (each rank's findings in its ``result <json>`` line):

- an async ``mgr.save`` of step 1 and, at once, ``dcp.save`` of step 2 through the same manager
  (their commits share one gloo group): both commit;
- step 2 holds a row-wise ShardedTensor (FSDP1's SHARDED_STATE_DICT form), a tensor list and
  plain values; rank 1 alone also a value stored pickled (its manager allows pickles);
- loaded with another manager (no pickles) into a column-wise ShardedTensor, a column-sharded
  DTensor, and a plain bf16 tensor (resharded and cast);
- ``_load_state_dict_from_keys("model")``: the nested dict back, full tensors;
- a load where rank 1's pickled value is refused: every rank fails, and no rank's live tensor
  changed (rank 0 read nothing refused itself).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharding_spec import ChunkShardingSpec

import spotckpt
from spotckpt.dcp import StorageReader, StorageWriter

FULL = torch.arange(24.0).reshape(4, 6)


def chunked(dim: int) -> sharded_tensor.ShardedTensor:
    """A 4x6 ShardedTensor split along ``dim`` over ranks 0 and 1, zeros."""
    return sharded_tensor.zeros(ChunkShardingSpec(dim=dim, placements=["rank:0/cpu", "rank:1/cpu"]), 4, 6)


def boxes(st: sharded_tensor.ShardedTensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(local shard, the same box of FULL) for each local shard of ``st``."""
    out = []
    for s in st.local_shards():
        (r, c), (nr, nc) = s.metadata.shard_offsets, s.metadata.shard_sizes
        out.append((s.tensor, FULL[r : r + nr, c : c + nc]))
    return out


def main() -> int:
    scenario, local_dir, _ = sys.argv[1:4]
    assert scenario == "parity", scenario
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    kw = {"metrics": False, "keep_last": None, "collective_timeout_seconds": float(os.environ.get("TIMEOUT", "120"))}
    result: dict[str, object] = {}

    rows = chunked(0)
    for local, want in boxes(rows):
        local.copy_(want)
    sd: dict[str, object] = {"model": {"st": rows, "b": torch.ones(3), "l": [torch.full((2,), 5.0)]}, "meta": {"n": 7}}
    if rank == 1:
        sd["odd"] = {"fn": print}  # JSON cannot hold it: stored pickled, as this manager allows
    with spotckpt.CheckpointManager(local_dir, allow_pickle=True, **kw) as mgr:
        # rank 1's async save takes longer to write: without the writer waiting for it, rank 1's
        # DCP commit would meet rank 0's async commit in the shared gloo group
        mgr.save(1, {"w": torch.ones(16 if rank == 0 else 1 << 22)}, blocking=False)  # still persisting ...
        dcp.save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=2)  # ... when this commits
        mgr.wait()
        result["steps"] = mgr.all_steps()

    with spotckpt.CheckpointManager(local_dir, **kw) as mgr:
        cols = chunked(1)
        dcp.load({"model": {"st": cols}}, storage_reader=StorageReader(mgr))
        result["columns"] = all(torch.equal(a, b) for a, b in boxes(cols)) and len(boxes(cols)) == 1

        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dt = distribute_tensor(torch.zeros(4, 6), init_device_mesh("cpu", (2,)), [Shard(1)])
        dcp.load({"model": {"st": dt}}, storage_reader=StorageReader(mgr))
        result["dtensor"] = torch.equal(dt.to_local(), FULL[:, 3 * rank : 3 * rank + 3])

        plain = {"st": torch.zeros(4, 6, dtype=torch.bfloat16), "l": [torch.zeros(2)]}
        dcp.load({"model": plain}, storage_reader=StorageReader(mgr))
        result["plain_bf16"] = (plain["st"].dtype == torch.bfloat16 and torch.equal(plain["st"], FULL.bfloat16())
                                and torch.equal(plain["l"][0], torch.full((2,), 5.0)))

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        got = _load_state_dict_from_keys("model", storage_reader=StorageReader(mgr))
        result["by_key"] = sorted(got) == ["model"] and sorted(got["model"]) == ["b", "l", "st"] and \
            torch.equal(got["model"]["st"], FULL) and torch.equal(got["model"]["l"][0], torch.full((2,), 5.0))

        target: dict[str, object] = {"model": {"st": torch.zeros(4, 6), "b": torch.zeros(3)}}
        if rank == 1:
            target["odd"] = {"fn": None}
        try:
            dcp.load(target, storage_reader=StorageReader(mgr))
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            result.update(error=type(exc).__name__, message=str(exc)[-1500:])
        model = target["model"]
        result["untouched"] = not model["st"].any().item() and not model["b"].any().item()  # type: ignore[index]
    print("result " + json.dumps(result), flush=True)
    # gloo may abort the process at teardown (a torch issue); everything is closed by now
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
