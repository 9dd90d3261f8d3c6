"""Side-by-side checkpoint benchmark: spotckpt against torch.save, DCP and torchsnapshot.

One command (``spotckpt bench`` or ``python benchmarks/bench_save.py``) measures, for each state
(256 MiB and 1 GiB fp32 CPU state dicts of 16 tensors; a 4 GiB bf16 state of 32 tensors on the GPU
when CUDA is present), every *row* below and writes ``save.json``, ``save.md`` and ``save.png``:

* floors: raw write+fsync of the same bytes; a copy into buffers allocated once and reused
  (CPU: ``dst.copy_(src)``; GPU: pinned device-to-host copy, ``non_blocking`` then synchronize);
  a fresh clone (what a naive snapshot pays), for reference;
* saves: ``torch.save`` + fsync; DCP ``save`` (``FileSystemWriter(sync_files=True)``, 2 threads on
  CPU, 8 on GPU); DCP ``async_save`` (time it blocks the caller and time until its future is done);
  torchsnapshot ``Snapshot.take`` + fsync of its files; spotckpt async (``save()`` stall, ``wait()``
  durable) and spotckpt blocking (``save(..., blocking=True)``);
* restores into the live tensors: ``torch.load(mmap=True, weights_only=True)`` + ``copy_``, DCP
  ``load``, torchsnapshot ``restore``, spotckpt ``restore``.

How it measures (and what it does not):

* Each row runs in its **own worker subprocess** (``python spotckpt/bench.py --worker SPEC``) that
  builds the state, then times the row: a warm-up call (recorded as ``first_s``; it pays one-time
  costs such as allocating staging buffers or DCP's planner cache), then best of ``--reps``.
  Separate processes keep rows from sharing allocator caches, thread pools or pinned memory.
* **Peak RSS delta** = the kernel's high-water mark (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus the RSS at the start of the row, over the warm-up and all reps,
  so memory a saver keeps between saves (a buffer pool) counts. Where ``clear_refs`` is not
  writable a ``spotckpt-bench-rss`` thread samples RSS every 2 ms with psutil (may miss short peaks).
  File pages mapped and touched (``torch.load(mmap=True)``) count towards RSS.
* Every output goes to a fresh path in a temporary directory on the disk under test (``--dir``, or
  ``$DIR``, default the system temp dir), removed afterwards. The page cache is **not** dropped:
  restores read what was just written, from memory. "Durable" means the saver's fsyncs returned.
* GB/s = state bytes / seconds (10^9 bytes). Stall and durable are minima taken independently.

Which thread calls what: everything runs on the main thread of the orchestrator or of a worker,
except the optional RSS sampler thread. Nothing here is imported by the library itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIB = 1 << 20
SCHEMA = "spotckpt-bench/1"
DEFAULT_SIZES_MIB = (256, 1024)
DEFAULT_GPU_GIB = 4.0
DEFAULT_REPS = 3
WORKER_TIMEOUT_S = 900.0
MARKER = "SPOTCKPT-BENCH-RESULT "


@dataclasses.dataclass(frozen=True, kw_only=True)
class RowDef:
    """One measured row: ``kind`` is "floor", "save" or "restore"; ``group`` names the peer."""

    name: str
    label: str
    kind: str
    group: str
    gpu_label: str | None = None


ROWS: tuple[RowDef, ...] = (
    RowDef(name="raw_write_fsync", label="raw write+fsync (floor)", kind="floor", group="floor"),
    RowDef(name="memcpy_reused", label="copy into reused buffers (floor)", kind="floor",
           group="floor", gpu_label="pinned D2H copy into reused buffers (floor)"),
    RowDef(name="clone_alloc", label="clone into fresh memory", kind="floor", group="floor",
           gpu_label="D2H .cpu() into fresh pageable memory"),
    RowDef(name="torch_save_fsync", label="torch.save + fsync", kind="save", group="torch"),
    RowDef(name="dcp_save", label="DCP save", kind="save", group="dcp"),
    RowDef(name="dcp_async_save", label="DCP async_save", kind="save", group="dcp"),
    RowDef(name="torchsnapshot_take", label="torchsnapshot take + fsync", kind="save",
           group="torchsnapshot"),
    RowDef(name="spotckpt_async", label="spotckpt save (async)", kind="save", group="spotckpt"),
    RowDef(name="spotckpt_blocking", label="spotckpt save (blocking)", kind="save",
           group="spotckpt"),
    RowDef(name="torch_load_mmap_copy", label="torch.load(mmap) + copy_", kind="restore",
           group="torch"),
    RowDef(name="dcp_load", label="DCP load", kind="restore", group="dcp"),
    RowDef(name="torchsnapshot_restore", label="torchsnapshot restore", kind="restore",
           group="torchsnapshot"),
    RowDef(name="spotckpt_restore", label="spotckpt restore", kind="restore", group="spotckpt"),
    RowDef(name="spotckpt_restore_noverify", label="spotckpt restore, verify_on_restore=False",
           kind="restore", group="spotckpt"),
)
ROW_BY_NAME = {r.name: r for r in ROWS}


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


# --------------------------------------------------------------------------------------------
# memory measurement


def _rss_bytes() -> int:
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
            if self._hwm() > _rss_bytes() + 16 * MIB:
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
            self._peak = max(self._peak, _rss_bytes())

    def reset(self) -> None:
        if self._thread is None:
            self._clear()
        else:
            self._peak = _rss_bytes()

    def peak(self) -> int:
        if self._thread is None:
            return self._hwm()
        return max(self._peak, _rss_bytes())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------------------------
# worker side: build a state, run one row


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.unlink(path)


def build_state(spec: StateSpec) -> dict[str, Any]:
    """A deterministic state dict whose tensors differ, so restores can be checked.

    Each tensor is a constant (its index + 1) with a distinct ramp over its first 4096 values:
    cheap to build (randn costs ~2.5 s per GiB on 2 cores, paid once per row's worker) and no
    peer compresses or deduplicates, so the content does not change what is measured.
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


def _nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class _Ctx:
    """What a row's functions share: the state, a scratch dir, a sync function, the spec."""

    def __init__(self, spec: StateSpec, state: dict[str, Any], workdir: str) -> None:
        import torch

        self.torch = torch
        self.spec = spec
        self.state = state
        self.workdir = workdir
        self.cuda = spec.device == "cuda"
        self.counter = 0

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def fresh(self, stem: str) -> str:
        self.counter += 1
        return os.path.join(self.workdir, f"{stem}-{self.counter}")

    def clobber(self) -> None:
        """Overwrite the live tensors before a restore, so a restore that does nothing fails."""
        with self.torch.no_grad():
            for t in self.state.values():
                t.fill_(0)
        self.sync()

    def snapshot_probe(self) -> dict[str, Any]:
        return {k: v[:257].clone() for k, v in self.state.items()}

    def check(self, probe: dict[str, Any]) -> None:
        for k, v in probe.items():
            if not self.torch.equal(self.state[k][:257], v):
                raise AssertionError(f"restored tensor {k} differs from what was saved")


# A row function returns per-call timings: {"stall": s, "durable": s}. ``prepare`` runs once,
# untimed (e.g. writes the checkpoint a restore row reads); ``call`` is timed, warm-up then reps.
RowFn = Callable[[], dict[str, float]]


def _row_impl(name: str, ctx: _Ctx) -> tuple[Callable[[], None], RowFn, Callable[[], None]]:
    """Return ``(prepare, call, finish)`` for row ``name``; imports of peers happen in here."""
    torch = ctx.torch
    state = ctx.state
    nothing = lambda: None  # noqa: E731

    def timed(fn: Callable[[], None]) -> RowFn:
        def run() -> dict[str, float]:
            ctx.sync()
            t0 = time.perf_counter()
            fn()
            ctx.sync()
            d = time.perf_counter() - t0
            return {"stall": d, "durable": d}
        return run

    if name in ("raw_write_fsync", "memcpy_reused", "clone_alloc"):
        host: dict[str, Any] = {}

        def prep_host() -> None:
            for k, v in state.items():
                host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=ctx.cuda)
                host[k].copy_(v)
            ctx.sync()

        if name == "raw_write_fsync":
            last: list[str] = []

            def raw() -> None:
                for p in last:
                    _remove(p)
                last.clear()
                p = ctx.fresh("raw.bin")
                last.append(p)
                with open(p, "wb", buffering=0) as f:
                    for t in (host.values() if ctx.cuda else state.values()):
                        # bf16 has no numpy dtype: write the raw bytes through a uint8 view
                        f.write(memoryview(t.contiguous().view(torch.uint8).numpy()))
                    os.fsync(f.fileno())
            return (prep_host if ctx.cuda else nothing), timed(raw), nothing

        if name == "memcpy_reused":
            def copy() -> None:
                for k, v in state.items():
                    host[k].copy_(v, non_blocking=ctx.cuda)

            if ctx.cuda:
                return prep_host, timed(copy), nothing
            copy_default = timed(copy)

            def copy_best() -> dict[str, float]:
                # A floor is the best copy this machine can do: torch's default intra-op threads
                # and one thread, whichever is faster (on a busy or small machine, OpenMP
                # threads fighting for cores can make the default several times slower).
                a = copy_default()
                n = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    b = copy_default()
                finally:
                    torch.set_num_threads(n)
                return a if a["stall"] <= b["stall"] else b
            return prep_host, copy_best, nothing

        def clone() -> None:
            out = {k: (v.cpu() if ctx.cuda else v.clone()) for k, v in state.items()}
            del out
        return nothing, timed(clone), nothing

    if name == "torch_save_fsync":
        last = []

        def tsave() -> None:
            for p in last:
                _remove(p)
            last.clear()
            p = ctx.fresh("torch.pt")
            last.append(p)
            with open(p, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        return nothing, timed(tsave), nothing

    if name == "torch_load_mmap_copy":
        path = os.path.join(ctx.workdir, "load.pt")
        probe: dict[str, Any] = {}

        def prep() -> None:
            probe.update(ctx.snapshot_probe())
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())

        def load() -> None:
            loaded = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
            with torch.no_grad():
                for k, t in state.items():
                    t.copy_(loaded[k], non_blocking=ctx.cuda)
            ctx.sync()
            del loaded
        return prep, _restore_timer(ctx, load, probe), nothing

    threads = 8 if ctx.cuda else 2
    if name in ("dcp_save", "dcp_async_save", "dcp_load"):
        import torch.distributed.checkpoint as dcp

        def writer(p: str) -> Any:
            return dcp.FileSystemWriter(p, thread_count=threads, sync_files=True)

        if name == "dcp_save":
            last = []

            def dsave() -> None:
                for p in last:
                    _remove(p)
                last.clear()
                p = ctx.fresh("dcp")
                last.append(p)
                dcp.save(state, storage_writer=writer(p))
            return nothing, timed(dsave), nothing

        if name == "dcp_async_save":
            last = []

            def dasync() -> dict[str, float]:
                for p in last:
                    _remove(p)
                last.clear()
                p = ctx.fresh("dcpa")
                last.append(p)
                ctx.sync()
                t0 = time.perf_counter()
                fut = dcp.async_save(state, storage_writer=writer(p))
                blk = time.perf_counter() - t0
                getattr(fut, "upload_completion", fut).result()
                return {"stall": blk, "durable": time.perf_counter() - t0}
            return nothing, dasync, nothing

        path = os.path.join(ctx.workdir, "dcp-load")
        probe = {}

        def dprep() -> None:
            probe.update(ctx.snapshot_probe())
            dcp.save(state, storage_writer=writer(path))

        def dload() -> None:
            dcp.load(state, storage_reader=dcp.FileSystemReader(path))
        return dprep, _restore_timer(ctx, dload, probe), nothing

    if name in ("torchsnapshot_take", "torchsnapshot_restore"):
        import torchsnapshot  # type: ignore[import-untyped]

        if name == "torchsnapshot_take":
            last = []

            def take() -> None:
                for p in last:
                    _remove(p)
                last.clear()
                p = ctx.fresh("snap")
                last.append(p)
                torchsnapshot.Snapshot.take(path=p, app_state={"m": torchsnapshot.StateDict(**state)})
                _fsync_tree(p)
            return nothing, timed(take), nothing

        path = os.path.join(ctx.workdir, "snap-load")
        probe = {}
        holder = torchsnapshot.StateDict(**state)

        def sprep() -> None:
            probe.update(ctx.snapshot_probe())
            torchsnapshot.Snapshot.take(path=path, app_state={"m": holder})

        def srestore() -> None:
            torchsnapshot.Snapshot(path=path).restore(app_state={"m": holder})
            with torch.no_grad():  # StateDict.load_state_dict may rebind; copy back if it did
                for k, t in state.items():
                    if holder[k] is not t:
                        t.copy_(holder[k])
        return sprep, _restore_timer(ctx, srestore, probe), nothing

    if name in ("spotckpt_async", "spotckpt_blocking", "spotckpt_restore", "spotckpt_restore_noverify"):
        from spotckpt import CheckpointManager  # type: ignore[attr-defined]

        local_dir = os.path.join(ctx.workdir, "spotckpt")
        mgr = CheckpointManager(local_dir=local_dir, s3_uri=None, keep_last=2, async_save=True,
                                verify_on_restore=name != "spotckpt_restore_noverify")
        step = [0]

        def finish() -> None:
            mgr.close()

        if name == "spotckpt_async":
            def save_async() -> dict[str, float]:
                step[0] += 1
                ctx.sync()
                t0 = time.perf_counter()
                mgr.save(step[0], state)
                # On a GPU save() returns before the pinned copy has run, but the training stream
                # waits for it: count the stall until the device is free again.
                ctx.sync()
                stall = time.perf_counter() - t0
                mgr.wait()
                return {"stall": stall, "durable": time.perf_counter() - t0}
            return nothing, save_async, finish

        if name == "spotckpt_blocking":
            def save_blocking() -> None:
                step[0] += 1
                mgr.save(step[0], state, blocking=True)
            return nothing, timed(save_blocking), finish

        probe = {}

        def rprep() -> None:
            probe.update(ctx.snapshot_probe())
            mgr.save(1, state, blocking=True)

        def restore() -> None:
            got = mgr.restore(state)
            if got != 1:
                raise AssertionError(f"spotckpt restore returned step {got!r}, expected 1")
        return rprep, _restore_timer(ctx, restore, probe), finish

    raise ValueError(f"unknown row {name!r}")


def _restore_timer(ctx: _Ctx, fn: Callable[[], None], probe: dict[str, Any]) -> RowFn:
    def run() -> dict[str, float]:
        ctx.clobber()
        t0 = time.perf_counter()
        fn()
        ctx.sync()
        d = time.perf_counter() - t0
        ctx.check(probe)
        return {"stall": d, "durable": d}
    return run


def run_worker(spec: StateSpec, row: str, *, reps: int, workdir: str) -> dict[str, Any]:
    """Build the state, run one row (warm-up + ``reps``), return its record. Runs in a worker."""
    t_build = time.perf_counter()
    state = build_state(spec)
    nbytes = _nbytes(state)
    ctx = _Ctx(spec, state, workdir)
    ctx.sync()
    build_s = time.perf_counter() - t_build
    rss = PeakRSS()
    rec: dict[str, Any] = {"row": row, "state": spec.key, "bytes": nbytes, "rss_method": rss.method,
                           "build_state_s": round(build_s, 3)}
    try:
        prepare, call, finish = _row_impl(row, ctx)
        try:
            prepare()
            ctx.sync()
            base = _rss_bytes()
            rss.reset()
            first = call()
            samples = [call() for _ in range(reps)]
            peak = rss.peak()
        finally:
            finish()
    finally:
        rss.close()
    rec.update(
        first_stall_s=first["stall"], first_durable_s=first["durable"],
        stall_samples_s=[s["stall"] for s in samples],
        durable_samples_s=[s["durable"] for s in samples],
        stall_s=min(s["stall"] for s in samples),
        durable_s=min(s["durable"] for s in samples),
        peak_rss_delta_bytes=max(0, peak - base),
        rss_base_bytes=base,
    )
    return rec


# --------------------------------------------------------------------------------------------
# orchestrator


def machine_info(base_dir: str) -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python, torch, GPU and the filesystem of the data directory."""
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    info["cpu_model"] = model
    with contextlib.suppress(Exception):
        import psutil

        info["ram_bytes"] = int(psutil.virtual_memory().total)
    with contextlib.suppress(OSError, ValueError):
        info.setdefault("ram_bytes", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    info["data_dir"] = base_dir
    info["data_fs"] = _fs_type(base_dir)
    info["page_cache_dropped"] = False
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = bool(torch.cuda.is_available())
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda_version"] = torch.version.cuda
    with contextlib.suppress(OSError):
        info["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    for mod in ("torchsnapshot", "numpy"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[mod] = f"unavailable: {exc!r}"[:200]
    return info


def _fs_type(path: str) -> str:
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, fstype = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return fstype


def _spawn_worker(spec: StateSpec, row: str, *, reps: int, base_dir: str,
                  timeout_s: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix=f"{row}-", dir=base_dir)
    payload = json.dumps({"spec": dataclasses.asdict(spec), "row": row, "reps": reps,
                          "workdir": workdir})
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    # run this file as a script (not ``-m spotckpt.bench``): rows that do not need spotckpt
    # still run where the package's own dependencies are missing (e.g. a bare GPU image)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", payload],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"row": row, "state": spec.key, "error": f"worker timed out after {timeout_s:.0f}s"}
    finally:  # on a timeout, Ctrl-C or SIGTERM, never leave a worker writing gigabytes behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            rec = json.loads(line[len(MARKER):])
            rec["worker_wall_s"] = round(time.perf_counter() - t0, 2)
            return rec
    tail = (stderr or stdout or "").strip().splitlines()[-3:]
    return {"row": row, "state": spec.key,
            "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"[:500]}


def worker_main(payload: str) -> int:
    """Entry of a worker subprocess: run one row and print its record after ``MARKER``."""
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


def plan_states(sizes_mib: Sequence[int], gpu_gib: float, *, cuda: bool) -> list[StateSpec]:
    specs = [StateSpec(device="cpu", dtype="float32", size_mib=s, n_tensors=16) for s in sizes_mib]
    if cuda and gpu_gib > 0:
        specs.append(StateSpec(device="cuda", dtype="bfloat16", size_mib=int(gpu_gib * 1024),
                               n_tensors=32))
    return specs


def run_suite(specs: Sequence[StateSpec], *, rows: Sequence[str], reps: int, base_dir: str,
              timeout_s: float = WORKER_TIMEOUT_S,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row for every state, each in its own worker; returns the JSON-ready result."""
    t0 = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(base_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="spotckpt-bench-", dir=base_dir)
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for spec, row in ((spec, row) for spec in specs for row in rows):
            try:
                rec = _spawn_worker(spec, row, reps=reps, base_dir=data_dir, timeout_s=timeout_s)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM (`timeout`): keep what was measured
                interrupted = True
                log.warning("spotckpt bench: interrupted during %s / %s", spec.key, row)
                break
            rdef = ROW_BY_NAME[row]
            rec["label"] = (rdef.gpu_label if spec.device == "cuda" and rdef.gpu_label
                            else rdef.label)
            rec["kind"] = rdef.kind
            rec["size_mib"] = spec.size_mib
            if "error" not in rec:
                rec["gbps"] = rec["bytes"] / rec["durable_s"] / 1e9
            results.append(rec)
            if progress is not None:
                progress(_progress_line(spec, rec))
        info = machine_info(data_dir)
        info["loadavg_1_5_15_at_start"] = load_start and [round(x, 2) for x in load_start]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reps": reps,
        "machine": info,
        "states": [dict(dataclasses.asdict(s), key=s.key, title=s.title) for s in specs],
        "rows": results,
        "summary": {s.key: summarize(results, s.key) for s in specs},
        "notes": [
            "each row runs in its own worker subprocess; warm-up call first (first_*), then best "
            "of `reps` (stall and durable minima taken independently)",
            "page cache not dropped: restores read the checkpoint just written, from memory",
            "peak_rss_delta_bytes: kernel VmHWM (reset via /proc/self/clear_refs) minus RSS at "
            "the start of the row, over warm-up and reps",
            "stall = time the caller is held; durable = until the saver's fsyncs returned",
        ],
        "interrupted": interrupted,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _progress_line(spec: StateSpec, rec: dict[str, Any]) -> str:
    if "error" in rec:
        return f"{spec.key:24s} {rec['row']:24s} n/a  {rec['error'][:120]}"
    return (f"{spec.key:24s} {rec['row']:24s} stall {rec['stall_s']:7.3f}s  durable "
            f"{rec['durable_s']:7.3f}s  {rec['gbps']:6.2f} GB/s  peakRSS+ "
            f"{rec['peak_rss_delta_bytes'] / MIB:7.0f} MiB")


# --------------------------------------------------------------------------------------------
# summary, markdown, plot


def _get(results: Sequence[dict[str, Any]], state: str, row: str) -> dict[str, Any] | None:
    for r in results:
        if r["state"] == state and r["row"] == row and "error" not in r:
            return r
    return None


def summarize(results: Sequence[dict[str, Any]], state: str) -> dict[str, Any]:
    """The issue's targets as ratios; ``None`` where a row needed for a ratio is missing."""
    g = lambda row: _get(results, state, row)  # noqa: E731
    out: dict[str, Any] = {}

    def ratio(key: str, num: dict[str, Any] | None, nf: str, den: dict[str, Any] | None, df: str,
              target: float | None, better: str) -> None:
        if num is None or den is None or den[df] <= 0:
            out[key] = None
            return
        val = num[nf] / den[df]
        met = None if target is None else (val <= target if better == "le" else val >= target)
        out[key] = {"value": val, "target": target, "better": better, "met": met}

    gpu = state.startswith("cuda")
    sa, sb, sr = g("spotckpt_async"), g("spotckpt_blocking"), g("spotckpt_restore")
    ratio("spotckpt_stall_over_memcpy", sa, "stall_s", g("memcpy_reused"), "stall_s", 1.5, "le")
    ratio("dcp_async_block_over_spotckpt_stall", g("dcp_async_save"), "stall_s", sa, "stall_s",
          20.0 if gpu else 5.0, "ge")
    ratio("spotckpt_blocking_throughput_over_raw", g("raw_write_fsync"), "durable_s", sb,
          "durable_s", 0.9, "ge")
    ratio("spotckpt_async_durable_over_raw", sa, "durable_s", g("raw_write_fsync"), "durable_s",
          None, "le")
    ratio("spotckpt_restore_over_torch_load_mmap", sr, "durable_s", g("torch_load_mmap_copy"),
          "durable_s", 1.0, "le")
    ratio("torch_save_over_spotckpt_blocking", g("torch_save_fsync"), "durable_s", sb,
          "durable_s", None, "ge")
    return out


_RATIO_TEXT = {
    "spotckpt_stall_over_memcpy": "spotckpt async stall ÷ memcpy floor",
    "dcp_async_block_over_spotckpt_stall": "DCP async_save blocking ÷ spotckpt stall "
                                           "(how many × lower spotckpt's stall is)",
    "spotckpt_blocking_throughput_over_raw": "spotckpt blocking throughput ÷ raw write+fsync",
    "spotckpt_async_durable_over_raw": "spotckpt async time-to-durable ÷ raw write+fsync",
    "spotckpt_restore_over_torch_load_mmap": "spotckpt restore time ÷ torch.load(mmap)+copy_",
    "torch_save_over_spotckpt_blocking": "torch.save+fsync time ÷ spotckpt blocking time",
}


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x >= 0.01 else f"{x:.4f}")


def _load(m: dict[str, Any]) -> str:
    a, b = m.get("loadavg_1_5_15_at_start"), m.get("loadavg_1_5_15_at_end")
    return f"{a[0]:.1f} at start, {b[0]:.1f} at end" if a and b else "unknown"


def render_markdown(result: dict[str, Any]) -> str:
    """The tables for the README: one per state, then the targets as ratios."""
    m = result["machine"]
    ram = m.get("ram_bytes", 0) / (1 << 30)
    lines = [
        "# Checkpoint save/restore, side by side",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count')} cores, {ram:.0f} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; torch {m.get('torch')}; data on {m.get('data_fs')}; {result['created']}; "
        f"load average (1 min) {_load(m)}.",
        f"Best of {result['reps']} after one warm-up call, each row in its own process; page "
        "cache not dropped (restores read from memory). Stall = time the caller is held; "
        "durable = until the saver's fsyncs returned. Peak RSS Δ = kernel high-water mark over "
        "the row minus RSS before it.",
    ]
    if result.get("interrupted"):
        lines.append("**Interrupted (Ctrl-C / SIGTERM): only the rows below were measured.**")
    load = (m.get("loadavg_1_5_15_at_start") or [0.0])[0]
    if m.get("cpu_count") and load > m["cpu_count"]:
        lines.append(f"**Warning: the machine was busy (load {load:.1f} on {m['cpu_count']} cores) "
                     "when this run started: timings are inflated and noisy.**")
    lines.append("")
    for st in result["states"]:
        key = st["key"]
        rows = [r for r in result["rows"] if r["state"] == key]
        floor = _get(result["rows"], key, "memcpy_reused")
        raw = _get(result["rows"], key, "raw_write_fsync")
        dcpa = _get(result["rows"], key, "dcp_async_save")
        lines += [f"## {st['title']}", "",
                  "| row | stall s | durable s | GB/s | peak RSS Δ MiB | stall ÷ copy floor "
                  "| durable ÷ raw write | stall vs DCP async_save | first call stall / durable s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['label']} | n/a | n/a | n/a | n/a | | | | {r['error'][:90]} |")
                continue
            vs_floor = (f"{r['stall_s'] / floor['stall_s']:.1f}×"
                        if floor and r["kind"] != "restore" else "")
            vs_raw = (f"{r['durable_s'] / raw['durable_s']:.2f}×"
                      if raw and r["kind"] == "save" else "")
            vs_dcpa = ""
            if dcpa and r["kind"] != "restore" and r["row"] != "dcp_async_save":
                f = dcpa["stall_s"] / r["stall_s"]
                vs_dcpa = f"{f:.1f}× lower" if f >= 1 else f"{1 / f:.1f}× higher"
            lines.append(
                f"| {r['label']} | {_fmt_s(r['stall_s'])} | {_fmt_s(r['durable_s'])} | "
                f"{r['gbps']:.2f} | {r['peak_rss_delta_bytes'] / MIB:.0f} | {vs_floor} | {vs_raw} "
                f"| {vs_dcpa} | {_fmt_s(r['first_stall_s'])} / {_fmt_s(r['first_durable_s'])} |")
        lines.append("")
        summ = result["summary"].get(key, {})
        lines += ["| target (issue 4) | measured | target | met |", "|---|---:|---:|---|"]
        for k, text in _RATIO_TEXT.items():
            v = summ.get(k)
            if v is None:
                lines.append(f"| {text} | n/a | | |")
                continue
            tgt = "" if v["target"] is None else ("≤ " if v["better"] == "le" else "≥ ") + \
                f"{v['target']:g}"
            met = "" if v["met"] is None else ("yes" if v["met"] else "**no**")
            lines.append(f"| {text} | {v['value']:.2f}× | {tgt} | {met} |")
        lines.append("")
    errs = [r for r in result["rows"] if "error" in r]
    if errs:
        lines += ["Rows that could not run:", ""]
        seen: set[tuple[str, str]] = set()
        for r in errs:
            if (r["row"], r["error"]) in seen:
                continue
            seen.add((r["row"], r["error"]))
            lines.append(f"- `{r['row']}` ({r['state']}): {r['error']}")
        lines.append("")
    return "\n".join(lines)


def render_plot(result: dict[str, Any], path: str) -> None:
    """A bar chart per state: stall and durable seconds for each row (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [st for st in result["states"]
              if any(r["state"] == st["key"] for r in result["rows"])]
    if not states:  # interrupted before the first row finished
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no rows were measured", ha="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, len(states), figsize=(6.5 * len(states), 6), squeeze=False)
    for ax, st in zip(axes[0], states):
        rows = [r for r in result["rows"] if r["state"] == st["key"]]
        labels = [r["label"].replace(" (floor)", "*") for r in rows]
        stall = [r.get("stall_s", 0.0) if "error" not in r else 0.0 for r in rows]
        dur = [r.get("durable_s", 0.0) if "error" not in r else 0.0 for r in rows]
        y = list(range(len(rows)))
        ax.barh([i + 0.2 for i in y], stall, height=0.4, label="stall (caller held)",
                color="#d62728")
        ax.barh([i - 0.2 for i in y], dur, height=0.4, label="durable / total", color="#1f77b4")
        for i, r in enumerate(rows):
            if "error" in r:  # x in axes fraction: a log axis has no 0
                ax.text(0.01, i, "n/a (see save.md)", va="center", fontsize=8,
                        transform=ax.get_yaxis_transform())
            if i and r["kind"] != rows[i - 1]["kind"] and "restore" in (r["kind"], rows[i - 1]["kind"]):
                ax.axhline(i - 0.5, color="grey", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log)")
        ax.set_title(st["title"], fontsize=10)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    m = result["machine"]
    fig.suptitle(f"Checkpoint save/restore — {m.get('gpu') or m.get('cpu_model')}, "
                 f"{m.get('cpu_count')} cores, torch {m.get('torch')} (* = physical floor)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: str, *, plot: bool = True) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "save.json"), "md": os.path.join(out_dir, "save.md"),
             "png": os.path.join(out_dir, "save.png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(render_markdown(result))
    if plot:
        render_plot(result, paths["png"])
    else:
        del paths["png"]
    return paths


def _parse_sizes(text: str) -> list[int]:
    text = text.strip()
    if text in ("", "none", "0"):
        return []
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotckpt bench",
        description="Side-by-side checkpoint benchmark: spotckpt vs torch.save, DCP, "
                    "torchsnapshot, with raw write+fsync and memcpy floors.")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_MIB)),
                   help="CPU fp32 state sizes in MiB, comma separated; 'none' for no CPU state "
                        "(default: %(default)s)")
    p.add_argument("--gpu-gib", type=float, default=DEFAULT_GPU_GIB,
                   help="bf16 GPU state size in GiB when CUDA is present; 0 to skip "
                        "(default: %(default)s)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help="timed repetitions after one warm-up; best is reported (default: 3)")
    p.add_argument("--rows", default="all",
                   help="comma-separated row names to run (default: all): "
                        + ", ".join(r.name for r in ROWS))
    p.add_argument("--out", default=os.path.join("benchmarks", "out"),
                   help="directory for save.json, save.md, save.png (default: %(default)s)")
    p.add_argument("--dir", default=os.environ.get("DIR") or tempfile.gettempdir(),
                   help="where checkpoints are written (a temp dir is made inside and removed); "
                        "default $DIR or the system temp dir")
    p.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S,
                   help="seconds one row's worker may run before it is recorded as failed")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spotckpt bench`` and ``benchmarks/bench_save.py``; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `spotckpt bench -- --sizes 256` hands the separator on
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    rows = [r.name for r in ROWS] if args.rows == "all" else [
        x.strip() for x in args.rows.split(",") if x.strip()]
    unknown = [r for r in rows if r not in ROW_BY_NAME]
    if unknown:
        print(f"unknown rows {unknown}; choose from {[r.name for r in ROWS]}", file=sys.stderr)
        return 2
    if args.reps < 1:
        print("--reps must be at least 1", file=sys.stderr)
        return 2
    import torch

    specs = plan_states(_parse_sizes(args.sizes), args.gpu_gib, cuda=torch.cuda.is_available())
    if not specs:
        print("nothing to run: no CPU sizes and no CUDA state", file=sys.stderr)
        return 2
    print(f"spotckpt bench: {len(specs)} state(s) x {len(rows)} row(s), reps={args.reps}, "
          f"data under {args.dir}", flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwinds through the worker's kill and the temp dir's removal

    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run_suite(specs, rows=rows, reps=args.reps, base_dir=args.dir,
                           timeout_s=args.timeout, progress=lambda s: print(s, flush=True))
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
    paths = write_outputs(result, args.out, plot=not args.no_plot)
    print(render_markdown(result))
    print(f"wrote {', '.join(paths.values())} in {result['wall_s']:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    # run as a script, sys.path[0] is this package's folder: drop it so its modules cannot shadow
    # top-level ones; the repo root arrives through PYTHONPATH (set by the orchestrator)
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    sys.exit(main())
