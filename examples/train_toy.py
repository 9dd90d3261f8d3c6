"""A small real training loop wrapped with spotckpt: stop it (SIGTERM) at any moment and start it
again -- it continues from the step it saved, with the same weights, optimizer, schedule, random
numbers and data order, so the final weights equal those of an uninterrupted run.

    python examples/train_toy.py --local-dir /tmp/ckpt --steps 400
    # Ctrl-C / kill -TERM <pid>, then run the same command again

Checkpoints go to --local-dir (default: $SPOTCKPT_LOCAL_DIR, SageMaker's LocalPath or
/opt/ml/checkpoints) and, with --s3-uri or $SPOTCKPT_S3_URI, to S3. --save-policy auto lets the
autopilot choose the interval (docs/autopilot.md); --state-mb adds untrained state to every
checkpoint, to try a large one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import torch
from torch import nn

import spotckpt
from spotckpt.data import ResumableDataLoader


def say(line: str) -> None:
    """Print one line with one write: under torchrun every rank shares one pipe, and print()'s
    separate write of the newline (unbuffered, as simulate runs it) lets ranks glue lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_dataset(n: int = 4096, dim: int = 32, seed: int = 1234) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = (x @ w + 0.1 * torch.randn(n, 1, generator=g)).squeeze(1)
    return torch.utils.data.TensorDataset(x, y)


class NoisyDataset(torch.utils.data.Dataset):
    """Adds random augmentation noise per sample, so data-loader RNG handling matters."""

    def __init__(self, base: torch.utils.data.TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        x, y = self.base[i]
        return x + 0.01 * torch.randn_like(x), y


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def policy_from(text: str | None, every_steps: int):  # type: ignore[no-untyped-def]
    """``--save-policy``: (every_steps, save_policy) for the manager."""
    if text is None:
        return every_steps, None
    if text == "auto":
        return "auto", None
    if text == "young-daly":
        from spotckpt.policy import AutoInterval

        return None, AutoInterval(notice_aware=False)
    if text.startswith("every:") and text[6:].isdigit() and int(text[6:]) > 0:
        return int(text[6:]), None
    raise SystemExit(f"train_toy: --save-policy is auto, every:N or young-daly, got {text!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="total optimizer steps")
    p.add_argument("--every-steps", type=int, default=25, help="checkpoint every N steps")
    p.add_argument("--save-policy", default=None, metavar="auto|every:N",
                   help="auto: AutoInterval chooses the interval (docs/autopilot.md); every:N: every N steps "
                        "(default: --every-steps); young-daly: Young/Daly from the total interruption rate, "
                        "ignoring notice (a baseline)")
    p.add_argument("--state-mb", type=float, default=0.0, help="extra MiB of state saved with every checkpoint")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--step-sleep", type=float, default=0.0, help="extra seconds per step (demo pacing)")
    p.add_argument("--local-dir", default=None)
    p.add_argument("--s3-uri", default=None)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--sync-save", action="store_true", help="blocking saves instead of async")
    p.add_argument("--print-every", type=int, default=25)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, args.hidden), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(args.hidden, args.hidden), nn.GELU(), nn.Dropout(0.1),
        nn.Linear(args.hidden, 1),
    )
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=3e-3, total_steps=args.steps)
    loader = ResumableDataLoader(NoisyDataset(make_dataset()), batch_size=args.batch_size, shuffle=True,
                                 seed=7, num_workers=args.workers, drop_last=True)
    state = {"model": model, "optim": optim, "sched": sched, "loader": loader,
             "rng": spotckpt.RNGState(), "losses": []}
    if args.state_mb:
        state["ballast"] = torch.zeros(int(args.state_mb * 2**20) // 4)
    every_steps, save_policy = policy_from(args.save_policy, args.every_steps)

    with spotckpt.CheckpointManager(local_dir=args.local_dir, s3_uri=args.s3_uri, every_steps=every_steps,
                                    save_policy=save_policy, keep_last=args.keep_last,
                                    async_save=not args.sync_save) as mgr:
        start = mgr.restore(state) or 0
        say(f"train_toy: starting at step {start} of {args.steps}")
        step = start
        it = iter(loader)
        while step < args.steps:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            model.train()
            loss = nn.functional.mse_loss(model(x).squeeze(1), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            loss_value = loss.item()
            state["losses"].append(loss_value)
            if step % args.print_every == 0:
                say(f"train_toy: step {step} loss {loss_value:.5f}")
            if args.step_sleep:
                time.sleep(args.step_sleep)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                say(f"train_toy: preempted at step {step}; checkpoint is durable, exiting 0")
                return 0
        mgr.save(step, state)
        mgr.wait()
    losses = hashlib.sha256(repr(state["losses"]).encode()).hexdigest()[:16]
    say(f"train_toy: done at step {step}; final loss {state['losses'][-1]:.5f}; "
        f"weights {weights_digest(model)}; losses {losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
