"""A DistributedDataParallel training loop wrapped with spotckpt: several ranks (and hosts) that
checkpoint, commit, upload, stop and resume as one job.

    torchrun --nproc_per_node 2 examples/train_ddp.py --local-dir /tmp/ckpt --steps 200
    # SIGTERM any one rank (or torchrun itself), then run the same command again

Every rank makes the same spotckpt calls. The DDP module and its optimizer are replicated, so
rank 0 alone writes them; each rank writes its own RNG, data position and loss history. A SIGTERM
that reaches only one rank still makes every rank save the same step and exit 0. Checkpoints go
to --local-dir (default: $SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath or /opt/ml/checkpoints) --
one directory per host -- and, with --s3-uri or $SPOTCKPT_S3_URI, to S3. The backend is gloo on
CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spotckpt
from spotckpt.data import ResumableDataLoader


def say(line: str) -> None:
    """Print one line with one write: under torchrun every rank shares one pipe, and print()'s
    separate write of the newline (unbuffered, as simulate runs it) lets ranks glue lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class NoisyRegression(torch.utils.data.Dataset):
    """A fixed regression problem with random augmentation noise per sample."""

    def __init__(self, n: int = 4096, dim: int = 32, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = (self.x @ w + 0.1 * torch.randn(n, 1, generator=g)).squeeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.x[i] + 0.01 * torch.randn_like(self.x[i]), self.y[i]


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--every-steps", type=int, default=20, help="checkpoint every N steps")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (demo pacing)")
    p.add_argument("--local-dir", default=None)
    p.add_argument("--s3-uri", default=None)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--print-every", type=int, default=10)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    net = nn.Sequential(nn.Linear(32, args.hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(args.hidden, 1)).to(device)
    model = DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=3e-3, total_steps=args.steps)
    loader = ResumableDataLoader(NoisyRegression(), batch_size=args.batch_size, shuffle=True, seed=7,
                                 drop_last=True, num_replicas=world, rank=rank)
    torch.manual_seed(100 + rank)  # dropout differs per rank, as in real jobs
    state = {"model": model, "optim": optim, "sched": sched, "loader": loader,
             "rng": spotckpt.RNGState(), "losses": []}

    tag = f"train_ddp[{rank}]"
    with spotckpt.CheckpointManager(local_dir=args.local_dir, s3_uri=args.s3_uri, every_steps=args.every_steps,
                                    keep_last=args.keep_last) as mgr:
        start = mgr.restore(state) or 0
        say(f"{tag}: starting at step {start} of {args.steps}")
        step = start
        it = iter(loader)
        while step < args.steps:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            model.train()
            loss = nn.functional.mse_loss(model(x.to(device)).squeeze(1), y.to(device))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            state["losses"].append(loss.item())
            if step % args.print_every == 0:
                say(f"{tag}: step {step} loss {state['losses'][-1]:.5f}")
            if args.step_sleep:
                time.sleep(args.step_sleep)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                say(f"{tag}: preempted at step {step}; checkpoint is durable on every rank, exiting 0")
                break
        else:
            mgr.save(step, state)
            mgr.wait()
            losses = hashlib.sha256(repr(state["losses"]).encode()).hexdigest()[:16]
            say(f"{tag}: done at step {step}; weights {digest(list(model.state_dict().values()))}; "
                f"losses {losses}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
