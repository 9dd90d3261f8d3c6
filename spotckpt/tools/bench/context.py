"""What a benchmark row works with inside its worker process: :class:`StateSpec` (the state to
build), :class:`Ctx` (the live state, a scratch directory, device sync, restore checks) and
:class:`Sample` (one call's timings)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

__all__ = ["Ctx", "Sample", "StateSpec", "fsync_tree", "remove"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StateSpec:
    """A synthetic state dict: ``n_tensors`` equal 1-D tensors totalling ``size_mib``."""

    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    size_mib: int
    n_tensors: int

    @property
    def key(self) -> str:
        return f"{self.device}-{self.dtype}-{self.size_mib}MiB"

    @property
    def title(self) -> str:
        size = f"{self.size_mib // 1024} GiB" if self.size_mib % 1024 == 0 else f"{self.size_mib} MiB"
        return f"{size} {self.dtype} on {self.device} ({self.n_tensors} tensors)"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One call's timings: ``stall`` = how long the caller was held, ``durable`` = until the
    saver's fsyncs returned (equal for a blocking call)."""

    stall: float
    durable: float



class Ctx:
    """What a row works with: the live state, a scratch directory, device sync, restore checks."""

    def __init__(self, spec: StateSpec, state: dict[str, Any], workdir: str) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.state = state
        self.workdir = workdir
        self.cuda = spec.device == "cuda"
        self._counter = 0
        self._last: str | None = None

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def next_path(self, stem: str) -> str:
        """A fresh output path; the previous one handed out is removed first, so a row that
        writes a new checkpoint per call keeps one on the disk at a time."""
        if self._last is not None:
            remove(self._last)
        self._counter += 1
        self._last = os.path.join(self.workdir, f"{stem}-{self._counter}")
        return self._last

    def timed(self, fn: Any) -> Sample:
        """Time ``fn()`` from a synchronized device to a synchronized device: stall = durable."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        d = time.perf_counter() - t0
        return Sample(stall=d, durable=d)

    def clobber(self) -> None:
        """Overwrite the live tensors before a restore, so a restore that does nothing fails."""
        with self.torch.no_grad():
            for t in self.state.values():
                t.fill_(0)
        self.sync()

    def probe(self) -> dict[str, Any]:
        """A copy of the head of every tensor, to compare with after a restore."""
        return {k: v[:257].clone() for k, v in self.state.items()}

    def check(self, probe: dict[str, Any]) -> None:
        for k, v in probe.items():
            if not self.torch.equal(self.state[k][:257], v):
                raise AssertionError(f"restored tensor {k} differs from what was saved")


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def fsync_tree(path: str) -> None:
    """fsync every file under ``path``, then ``path`` itself."""
    from spotckpt.format import fsync_path

    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(root, name))
    fsync_path(path, directory=True)
