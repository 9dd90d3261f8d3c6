"""``spotckpt bench``: checkpoint save and restore throughput on this machine, side by side.

spotckpt is measured with the checkpointers people compare it with (``torch.save``, DCP,
torchsnapshot) and with the physical floors (raw write+fsync, a copy into reused buffers), for
the same synthetic state in the same run, on the disk given by ``--dir``. Each row is a small
class in :mod:`spotckpt.tools.bench.rows`; rows whose packages do not import here are reported as
skipped. Each row runs in its own worker process (:mod:`spotckpt.tools.bench.worker`), and the results
go to ``save.json``, ``save.md`` and ``save.png`` (:mod:`spotckpt.tools.bench.report`). Method and
caveats: ``benchmarks/README.md``. ``spotckpt bench s3`` (:mod:`spotckpt.tools.bench.s3peers`)
measures save -> S3 and restore from S3 against s3torchconnector and boto3 on an S3 endpoint.

Threads: everything runs on the main thread of the orchestrator or of a worker, except a worker's
optional RSS sampler thread. The library itself never imports this package.
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

from spotckpt.tools.bench.report import plot_unavailable, progress_line, render_markdown, summarize, write_outputs
from spotckpt.tools.bench.rows import ROW_BY_NAME, ROWS, Row, select
from spotckpt.tools.bench.worker import MARKER, StateSpec

__all__ = ["main", "build_parser", "run_suite", "plan_states", "machine_info", "ROWS",
           "ROW_BY_NAME", "StateSpec", "SCHEMA"]

log = logging.getLogger(__name__)

SCHEMA = "spotckpt-bench/1"
DEFAULT_SIZES_MIB = (256, 1024)
DEFAULT_GPU_GIB = 4.0
DEFAULT_REPS = 3
WORKER_TIMEOUT_S = 900.0
_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the spotckpt package

# A worker imports spotckpt.tools.bench without running spotckpt/__init__.py when the package's own
# dependencies are missing (e.g. a bare GPU image): the peers' rows still run there.
_WORKER_BOOT = """\
import sys, types
if sys.path and sys.path[0] == "":
    sys.path.pop(0)  # the caller's working directory must not shadow top-level modules
try:
    import spotckpt
except ImportError:
    stub = types.ModuleType("spotckpt")
    stub.__path__ = [sys.argv[2]]
    sys.modules["spotckpt"] = stub
from spotckpt.tools.bench.worker import worker_main
sys.exit(worker_main(sys.argv[1]))
"""


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return model


def split_cpus(spec: str) -> tuple[frozenset[int], frozenset[int]]:
    """``--server-cpus``: the CPUs that ``spec`` names (``"1"``, ``"2,3"``, ``"2-3"``) for a local
    S3 server, and the rest of this process's CPUs for the client, as S3 runs on machines of its
    own. Pins the calling thread -- and so the threads and processes it starts afterwards -- to the
    rest; call it before starting any. ValueError when ``spec`` is malformed, names a CPU this
    process may not use, or leaves the client none."""
    mine = frozenset(os.sched_getaffinity(0))
    server: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            server.update(range(int(lo), int(hi if dash else lo) + 1))
    except ValueError:
        raise ValueError(f"--server-cpus {spec!r}: expected CPU numbers like 1, 2,3 or 2-3") from None
    if not server or not server <= mine or server == mine:
        raise ValueError(f"--server-cpus {spec!r}: name some, not all, of the CPUs this process may use "
                         f"({', '.join(map(str, sorted(mine)))})")
    client = mine - server
    os.sched_setaffinity(0, client)
    return frozenset(server), client


def machine_info(base_dir: str) -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python, torch, GPU and the filesystem of the data directory."""
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpu_count": os.cpu_count()}
    info["cpu_model"] = cpu_model()
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
    env["PYTHONPATH"] = str(_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT, payload, str(_ROOT / "spotckpt")],
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


def plan_states(sizes_mib: Sequence[int], gpu_gib: float, *, cuda: bool) -> list[StateSpec]:
    specs = [StateSpec(device="cpu", dtype="float32", size_mib=s, n_tensors=16) for s in sizes_mib]
    if cuda and gpu_gib > 0:
        specs.append(StateSpec(device="cuda", dtype="bfloat16", size_mib=int(gpu_gib * 1024),
                               n_tensors=32))
    return specs


def run_suite(specs: Sequence[StateSpec], *, rows: Sequence[type[Row]], reps: int, base_dir: str,
              timeout_s: float = WORKER_TIMEOUT_S,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every available row for every state, each in its own worker; the JSON-ready result.

    A row whose needs do not import here is recorded with ``skipped`` (the reason) and not run.
    """
    t0 = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(base_dir, exist_ok=True)
    data_dir = tempfile.mkdtemp(prefix="spotckpt-bench-", dir=base_dir)
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        for spec in specs:
            for row in rows:
                why = row.unavailable()
                if why is not None:
                    rec: dict[str, Any] = {"row": row.name, "state": spec.key, "skipped": why}
                else:
                    try:
                        rec = _spawn_worker(spec, row.name, reps=reps, base_dir=data_dir,
                                            timeout_s=timeout_s)
                    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep what was measured
                        interrupted = True
                        log.warning("spotckpt bench: interrupted during %s / %s", spec.key, row.name)
                        break
                rec.update(label=row.label_for(spec.device), kind=row.kind, size_mib=spec.size_mib)
                if "stall_s" in rec:
                    rec["gbps"] = rec["bytes"] / rec["durable_s"] / 1e9
                results.append(rec)
                if progress is not None:
                    progress(progress_line(spec.key, rec))
            if interrupted:
                break
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


def _parse_sizes(text: str) -> list[int]:
    text = text.strip()
    if text in ("", "none", "0"):
        return []
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spotckpt bench",
        description="Checkpoint save and restore throughput on this machine: spotckpt side by "
                    "side with torch.save, DCP and torchsnapshot, and with the raw write+fsync "
                    "and memory-copy floors. `spotckpt bench s3 --help`: save to S3 and restore "
                    "from S3 side by side with s3torchconnector and boto3.")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_MIB)),
                   help="CPU fp32 state sizes in MiB, comma separated; 'none' for no CPU state "
                        "(default: %(default)s)")
    p.add_argument("--gpu-gib", type=float, default=DEFAULT_GPU_GIB,
                   help="bf16 GPU state size in GiB when CUDA is present; 0 to skip "
                        "(default: %(default)s)")
    p.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help="timed repetitions after one warm-up; best is reported (default: 3)")
    p.add_argument("--rows", default="all",
                   help="comma-separated row names to run (default: all; see --list)")
    p.add_argument("--list", action="store_true",
                   help="list the rows, whether each can run here, and exit")
    p.add_argument("--out", default=os.path.join("benchmarks", "out"),
                   help="directory for save.json, save.md, save.png (default: %(default)s)")
    p.add_argument("--dir", default=os.environ.get("DIR") or tempfile.gettempdir(),
                   help="where checkpoints are written (a temp dir is made inside and removed); "
                        "default $DIR or the system temp dir")
    p.add_argument("--timeout", type=float, default=WORKER_TIMEOUT_S,
                   help="seconds one row's worker may run before it is recorded as failed")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--from-json", metavar="FILE",
                   help="measure nothing: render save.md (and save.png) into --out from a "
                        "save.json written earlier")
    return p


def list_rows() -> str:
    lines = []
    for row in ROWS:
        why = row.unavailable()
        lines.append(f"{row.name:26s} {row.kind:8s} {row.label}"
                     + ("" if why is None else f"  [skipped here: {why}]"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spotckpt bench`` and ``benchmarks/bench_save.py``; returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `spotckpt bench -- --sizes 256` hands the separator on
        argv = argv[1:]
    if argv[:1] == ["s3"]:  # `spotckpt bench s3 ...`: the S3 peers (spotckpt.tools.bench.s3peers)
        from spotckpt.tools.bench.s3peers import main as s3_main

        return s3_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list:
        print(list_rows())
        return 0
    no_plot = None if args.no_plot else plot_unavailable()
    if no_plot is not None:
        print(f"spotckpt bench: {no_plot}", file=sys.stderr, flush=True)  # said before measuring
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        paths = write_outputs(result, args.out, plot=not args.no_plot, json_too=False)
        print(f"wrote {', '.join(paths.values())}")
        return 0
    try:
        rows = select(args.rows)
    except ValueError as exc:
        print(exc, file=sys.stderr)
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
