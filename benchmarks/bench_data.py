"""The data loader's per-batch cost: ``ResumableDataLoader`` against a plain ``DataLoader``.

    python benchmarks/bench_data.py [--samples 8192] [--batch-size 64] [--tokens 128]
                                    [--epochs 41] [--num-workers 0] [--json PATH]

Both load the same cheap map-style dataset (each sample a row of ``--tokens`` int64 tokens from
one pre-built tensor, so the loaders' own overhead dominates), shuffled, in the same process.
Epochs alternate between the two loaders so machine noise hits both alike; each epoch's time
per batch is one sample, and the medians are reported with their ratio. The plain loader is
what a training loop would use without exact resume: ``DataLoader(ds, batch_size, shuffle=True)``.
Development script; results and method in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: another copy can be compared

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import spotckpt.data  # noqa: E402
from spotckpt.data import ResumableDataLoader  # noqa: E402


class Tokens(Dataset):
    """``n`` samples of ``tokens`` int64 each: ``__getitem__`` is one row view of one tensor."""

    def __init__(self, n: int, tokens: int) -> None:
        self.data = torch.arange(n * tokens, dtype=torch.int64).view(n, tokens)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def time_epoch(loader: Any) -> tuple[float, int]:
    """Seconds per batch over one full epoch, and the number of batches."""
    n = 0
    t0 = time.perf_counter()
    for _ in loader:
        n += 1
    return (time.perf_counter() - t0) / n, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--epochs", type=int, default=41, help="timed epochs per loader (after one warm-up)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", help="also write the result as JSON here")
    args = p.parse_args(argv)

    ds = Tokens(args.samples, args.tokens)
    kw: dict[str, Any] = {"batch_size": args.batch_size, "num_workers": args.num_workers}
    if args.num_workers:
        kw["persistent_workers"] = True
    loaders = {
        "DataLoader": DataLoader(ds, shuffle=True, **kw),
        "ResumableDataLoader": ResumableDataLoader(ds, shuffle=True, seed=0, **kw),
    }
    per_batch: dict[str, list[float]] = {name: [] for name in loaders}
    batches = 0
    for name, loader in loaders.items():  # warm-up: first iterator, worker start-up, caches
        time_epoch(loader)
    for _ in range(args.epochs):
        for name, loader in loaders.items():
            s, batches = time_epoch(loader)
            per_batch[name].append(s)

    med = {name: statistics.median(v) for name, v in per_batch.items()}
    ratio = med["ResumableDataLoader"] / med["DataLoader"]
    # each round's two epochs ran back to back: their ratio is less exposed to load changes
    paired = statistics.median(r / p for r, p in zip(per_batch["ResumableDataLoader"],
                                                      per_batch["DataLoader"]))
    print(f"{args.samples} samples of {args.tokens} int64 tokens, batch {args.batch_size}, "
          f"num_workers={args.num_workers}, {batches} batches per epoch, median of {args.epochs} "
          f"epochs; torch {torch.__version__}, {os.cpu_count()} CPUs; {spotckpt.data.__file__}")
    for name, v in per_batch.items():
        us = med[name] * 1e6
        print(f"  {name:20s} {us:8.1f} µs/batch  ({us / args.batch_size:5.2f} µs/sample; "
              f"min {min(v) * 1e6:.1f}, max {max(v) * 1e6:.1f})")
    print(f"  ratio ResumableDataLoader / DataLoader: {ratio:.2f}x of the medians, "
          f"{paired:.2f}x median of the paired rounds")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "per_batch_s": per_batch, "median_per_batch_s": med,
                       "ratio": ratio, "paired_ratio": paired, "spotckpt_data": spotckpt.data.__file__, "torch": torch.__version__, "cpu_count": os.cpu_count(),
                       "platform": platform.platform(),
                       "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
