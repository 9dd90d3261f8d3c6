"""The worker side of ``spotckpt bench``: build a synthetic state, run one row, report it.

Each row runs in its own worker process (see :func:`spotckpt.tools.bench.run_suite`), which prints one
line ``MARKER + json`` with the row's record. Everything here runs on the worker's main thread,
except the optional ``spotckpt-bench-rss`` sampler thread of :class:`PeakRSS`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from spotckpt.tools.bench.context import Ctx, StateSpec
from spotckpt.tools.bench.rows import ROW_BY_NAME

MIB = 1 << 20
MARKER = "SPOTCKPT-BENCH-RESULT "


def build_state(spec: StateSpec) -> dict[str, Any]:
    """A deterministic state dict whose tensors differ, so restores can be checked.

    Each tensor is a constant (its index + 1) with a distinct ramp over its first 4096 values:
    cheap to build, and no peer compresses or deduplicates, so the content does not change what
    is measured.
    """
    import torch

    dtype = getattr(torch, spec.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per = spec.size_mib * MIB // itemsize // spec.n_tensors
    state = {}
    for i in range(spec.n_tensors):
        t = torch.full((per,), float(i + 1), dtype=dtype, device=spec.device)
        head = min(per, 4096)
        t[:head] = torch.arange(head, dtype=torch.float32, device=spec.device).mul_(1e-3).add_(i)
        state[f"layer{i}.weight"] = t
    return state


# --------------------------------------------------------------------------------------------
# memory measurement


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """Peak resident memory of this process since :meth:`reset`.

    Uses the kernel's high-water mark (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``)
    where possible; otherwise a daemon thread ``spotckpt-bench-rss`` samples RSS every 2 ms.
    Called from the worker's main thread only; :meth:`close` joins the sampler.
    """

    def __init__(self) -> None:
        self.method = "VmHWM"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._clear()
            probe = bytearray(32 * MIB)  # zero-filled: every page touched, then freed
            del probe
            self._clear()
            # some kernels (gVisor) accept the write but do not reset the mark: check it did
            if self._hwm() > rss_bytes() + 16 * MIB:
                raise ValueError("writing /proc/self/clear_refs does not reset VmHWM here")
        except (OSError, ValueError):
            self.method = "sampled-2ms"
            self._thread = threading.Thread(target=self._sample, name="spotckpt-bench-rss",
                                            daemon=True)
            self._thread.start()

    @staticmethod
    def _clear() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise ValueError("no VmHWM in /proc/self/status")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, rss_bytes())

    def reset(self) -> None:
        if self._thread is None:
            self._clear()
        else:
            self._peak = rss_bytes()

    def peak(self) -> int:
        if self._thread is None:
            return self._hwm()
        return max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------------------------
# one row in this process


def run_worker(spec: StateSpec, row: str, *, reps: int, workdir: str) -> dict[str, Any]:
    """Build the state, run one row (warm-up + ``reps``), return its record."""
    t_build = time.perf_counter()
    state = build_state(spec)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    ctx = Ctx(spec, state, workdir)
    ctx.sync()
    build_s = time.perf_counter() - t_build
    rss = PeakRSS()
    rec: dict[str, Any] = {"row": row, "state": spec.key, "bytes": nbytes, "rss_method": rss.method,
                           "build_state_s": round(build_s, 3)}
    try:
        impl = ROW_BY_NAME[row](ctx)
        try:
            impl.prepare()
            ctx.sync()
            base = rss_bytes()
            rss.reset()
            first = impl.call()
            samples = [impl.call() for _ in range(reps)]
            peak = rss.peak()
        finally:
            impl.close()
    finally:
        rss.close()
    rec.update(
        first_stall_s=first.stall, first_durable_s=first.durable,
        stall_samples_s=[s.stall for s in samples],
        durable_samples_s=[s.durable for s in samples],
        stall_s=min(s.stall for s in samples),
        durable_s=min(s.durable for s in samples),
        peak_rss_delta_bytes=max(0, peak - base),
        rss_base_bytes=base,
    )
    return rec


def worker_main(payload: str) -> int:
    """Entry of a worker process: run one row and print its record after ``MARKER``."""
    job = json.loads(payload)
    spec = StateSpec(**job["spec"])
    try:
        rec = run_worker(spec, job["row"], reps=int(job["reps"]), workdir=job["workdir"])
    except BaseException as exc:  # noqa: BLE001 - any failure becomes an "n/a" row with its reason
        if isinstance(exc, KeyboardInterrupt):
            raise
        rec = {"row": job["row"], "state": spec.key, "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(MARKER + json.dumps(rec), flush=True)
    return 0
