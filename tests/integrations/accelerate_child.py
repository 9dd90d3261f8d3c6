"""One rank of a 2-rank Accelerate loop (gloo, CPU) through AccelerateCheckpoints, for
test_ranks_frameworks, on hosts ``h<r>`` with S3, saving every 4 steps.

``WORK URI kill``: rank 1 is SIGKILLed in the middle of the save of step 8 (``save_state`` has
written its files, nothing is adopted yet); the process dies or fails.
``WORK URI``, in one process: the restart on hosts ``h<r>`` (from step 4), interrupted by SIGTERM
to rank 1 only at step 6; a resumed run on fresh hosts ``b<r>`` from S3; an uninterrupted run.
Prints ``result <json>``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from spotckpt.integrations.accelerate import AccelerateCheckpoints

STEPS = 12
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index


def run(local_dir: Path, s3_uri: str | None, sigterm_at: int | None = None,
        die_in_save: int | None = None) -> dict[str, object]:
    accelerator.free_memory()  # forget the previous run's model and optimizer
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    losses: dict[int, float] = {}
    with AccelerateCheckpoints(accelerator, every_steps=4, local_dir=local_dir, s3_uri=s3_uri, keep_last=None,
                               metrics=False) as spot:
        if die_in_save is not None and rank == 1:
            save_state = accelerator.save_state

            def dying_save_state(output_dir: str) -> None:
                save_state(output_dir)
                if output_dir.endswith(f"checkpoint-{die_in_save}"):
                    print(f"dying in the save of {die_in_save}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

            accelerator.save_state = dying_save_state  # type: ignore[method-assign]
        start = spot.restore() or 0
        for step in range(start, STEPS):
            g = torch.Generator().manual_seed(step * 10 + rank)
            x = torch.randn(4, 8, generator=g)
            loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            losses[step + 1] = loss.item()
            if step + 1 == sigterm_at and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this rank only
            if spot.maybe_save(step + 1):
                break
        preempted = spot.preempted
    h = hashlib.sha256()
    for k, v in sorted(accelerator.unwrap_model(model).state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return {"start": start, "losses": losses, "weights": h.hexdigest()[:16], "preempted": preempted}


def main() -> int:
    work, uri = Path(sys.argv[1]), sys.argv[2]
    if sys.argv[3:] == ["kill"]:
        run(work / f"h{rank}", uri, die_in_save=8)
        return 0  # rank 0: never here (the adopt of step 8 fails on it)
    out = {"a": run(work / f"h{rank}", uri, sigterm_at=6), "b": run(work / f"b{rank}", uri),
           "ref": run(work / f"ref{rank}", None)}
    print("result " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
