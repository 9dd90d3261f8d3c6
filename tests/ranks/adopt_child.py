"""One rank of a 2-rank gloo job that adopts framework-like folders, for test_adopt_ranks.

    python adopt_child.py WORK_DIR        (RANK, WORLD_SIZE, MASTER_* from the env; S3_URI optional)

Rank r is host r (its own local dir ``WORK_DIR/a<r>`` and scratch folder): like the Trainer, rank
0 writes the model, the state and its RNG file, rank 1 only its RNG file (``save_on_each_node``
off, no shared filesystem). Then, in one run: adopt steps 10 and 20 (20 asynchronously) with S3;
restore_folder on fresh hosts ``b<r>`` from S3; restore_folder on the first hosts without S3 (the
files each lacks are sent by the other host). Prints ``result <json>``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import spotckpt


def write_folder(out: Path, step: int, rank: int) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (d / "model.safetensors").write_bytes(bytes([step]) * 3000)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (d / f"rng_state_{rank}.pth").write_bytes(bytes([rank, step]) * 100)
    return d


def files_of(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_bytes().hex()[:16] for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def main() -> int:
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    uri = os.environ["S3_URI"]
    kw = {"metrics": False, "keep_last": None, "collective_timeout_seconds": 60.0}
    out: dict[str, object] = {}
    with spotckpt.CheckpointManager(work / f"a{rank}", uri, **kw) as mgr:
        mgr.adopt(10, write_folder(work / f"out{rank}", 10, rank), meta={"framework": "test"})
        mgr.adopt(20, write_folder(work / f"out{rank}", 20, rank), blocking=False)
        assert mgr.wait()
        out["adopted"] = files_of(mgr.local.step_path(20))
        out["again"] = str(mgr.adopt(20, None))  # committed: every rank skips it
    with spotckpt.CheckpointManager(work / f"b{rank}", uri, **kw) as mgr:  # a fresh host: from S3
        path = mgr.restore_folder()
        out["from_s3"] = [str(path), files_of(path)]
    with spotckpt.CheckpointManager(work / f"a{rank}", None, **kw) as mgr:  # no S3: from the other host
        path = mgr.restore_folder()
        out["from_host"] = [str(path), files_of(path)]
        out["older"] = str(mgr.restore_folder(step=10))
    print("result " + json.dumps(out), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
