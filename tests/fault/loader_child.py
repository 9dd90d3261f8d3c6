"""Trainer with a plain torch DataLoader (2 worker processes) for the signal-forwarding test."""

from __future__ import annotations

import sys
import time

import torch

from spotckpt import CheckpointManager


def main() -> int:
    ds = torch.utils.data.TensorDataset(torch.arange(10_000.0))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    state = {"w": torch.zeros(4)}
    with CheckpointManager(sys.argv[1], every_steps=10**9, metrics=False) as mgr:
        for step, (x,) in enumerate(loader, start=1):
            state["w"] += x.sum()
            print(f"at {step}", flush=True)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                print(f"preempted {step}", flush=True)
                return 0
            time.sleep(0.01)
    return 3


if __name__ == "__main__":
    sys.exit(main())
