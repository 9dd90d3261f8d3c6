"""Sharded state (FSDP2 ``fully_shard`` on gloo/CPU), side by side in one run: spotckpt against DCP.

    python benchmarks/bench_sharded.py [--mib 256] [--ranks 2] [--saves 9] [--restores 5]
                                       [--save-ranks 4] [--restore-ranks 2] [--out benchmarks/out/sharded.json]

The state: a stack of ``nn.Linear(width, width)`` layers of ``--mib`` MiB of fp32 parameters in
all, each layer and the root wrapped with ``fully_shard``, and an AdamW whose state was created
by one real training step (so the optimizer holds 2x the parameters, plus one ``step`` scalar per
parameter). Every value is then set to a function of its tensor's name and its global index, so
that a restore onto any number of ranks can be checked element by element, cheaply.

Rows (each a real gloo job on 127.0.0.1, ``OMP_NUM_THREADS=1`` as torchrun sets it, every rank of
a job on one "host": one shared checkpoint directory). In every row the methods are interleaved
within each repeat (their order rotating), the first repeat is a warm-up and not counted, and a
barrier lines the ranks up before each timed call:

1. durable save, ``--ranks`` ranks: ``mgr.save(step, {"model": m, "optim": o}, blocking=True)``
   (fsync, atomic commit, manifest) vs ``dcp.save(get_state_dict(m, o), storage_writer=
   FileSystemWriter(fresh dir))`` (fsyncs by default) vs ``dcp.save(..., storage_writer=
   spotckpt.dcp.StorageWriter(mgr), checkpoint_id=step)``. Job time of a save = the slowest rank;
   GB/s = the job's bytes (every rank's shards) / the median job time. Only one checkpoint per
   method is on the disk at a time (the previous one is removed, untimed).
2. async stall per rank, ``--ranks`` ranks: spotckpt ``mgr.save(step, state)`` (async; ``wait()``
   between saves, untimed) vs ``dcp.async_save(...)`` (the time the call blocks; ``.result()``
   untimed; its own gloo group, as DCP recommends) vs the copy floor: every rank copying the
   ``to_local()`` of every DTensor of the model's and optimizer's state into buffers allocated
   once, all ranks at the same moment. Reported: the worst rank's median.
3. resharding restore ``--save-ranks`` -> ``--restore-ranks``: one job saves the state once by
   each method; a second job, with fewer ranks and other values in its live tensors, restores it
   ``--restores`` times by each method: ``mgr.restore(state)`` (``verify_on_restore=True``, the
   default: CRC32C of every file read) vs ``get_state_dict`` + ``dcp.load(sd, storage_reader=
   FileSystemReader(path))`` + ``set_state_dict`` vs the same with ``spotckpt.dcp.StorageReader``.
   Time of the restore = the slowest rank; the page cache is warm for every method (the files were
   just written, and read by the earlier repeats). Before each restore every live value is
   overwritten; after it every element of every tensor is compared with what was saved, so a
   broken restore is reported as such, not as fast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER = r'''
import os
os.environ["OMP_NUM_THREADS"] = "1"  # as torchrun sets it
import gc, json, math, shutil, sys, time, zlib
import torch, torch.distributed as dist
from torch import nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
import spotckpt
import spotckpt.dcp as sdcp

cfg = json.loads(sys.argv[1])
mode, work = cfg["mode"], cfg["work"]
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {"rank": rank, "world": world}
KW = dict(metrics=False, every_steps=None, install_signal_handlers=False)


def build(seed):
    torch.manual_seed(seed)
    w = cfg["width"]
    model = nn.Sequential(*[nn.Linear(w, w) for _ in range(cfg["layers"])])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, w)).square().mean().backward()  # one real step creates AdamW's state
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def named_locals(model, opt):
    """(name, DTensor) of every sharded tensor, the same names on any number of ranks."""
    out = []
    for n, p in model.named_parameters():
        out.append((f"model/{n}", p))
        for k in ("exp_avg", "exp_avg_sq"):
            out.append((f"optim/{n}/{k}", opt.state[p][k]))
    return out


def steps(opt):
    return [st["step"] for st in opt.state.values()]


def expected(name, dt):
    """The value of DTensor ``dt``'s local shard: a function of its name and global index."""
    shape, off = compute_local_shape_and_global_offset(dt.shape, dt.device_mesh, dt.placements)
    assert all(o == 0 for o in off[1:]), "only dim-0 sharding (FSDP2) is checked"
    start = off[0] * math.prod(dt.shape[1:]) if dt.dim() else 0
    idx = torch.arange(start, start + math.prod(shape), dtype=torch.int64)
    v = (idx * 2654435761 + zlib.crc32(name.encode())) % 1000003
    return v.to(torch.float32).mul_(1.0 / 1000003).sub_(0.5).view(shape)


def set_values(model, opt):
    with torch.no_grad():
        for name, dt in named_locals(model, opt):
            dt.to_local().copy_(expected(name, dt))
        for s in steps(opt):
            s.fill_(1.0)


def local_bytes(model, opt):
    n = sum(dt.to_local().numel() * 4 for _, dt in named_locals(model, opt))
    return n + sum(s.numel() * s.element_size() for s in steps(opt))


def job_bytes(model, opt):
    t = torch.tensor([local_bytes(model, opt)], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


GC = {"t": 0.0, "t0": 0.0}


def _gc_clock(phase, info):
    if phase == "start":
        GC["t0"] = time.perf_counter()
    else:
        GC["t"] += time.perf_counter() - GC["t0"]


gc.callbacks.append(_gc_clock)
gc_in_calls = {}


def timed(fn, method):
    """Seconds of ``fn()`` on this rank, every rank starting together. The cyclic garbage
    collector starts empty-handed (gc.collect() before, untimed), so a collection owed to
    another method's allocations is not charged to this one; the time the collector still
    takes inside the call is recorded (gc_s)."""
    gc.collect()
    dist.barrier()
    GC["t"] = 0.0
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    gc_in_calls.setdefault(method, []).append(GC["t"])
    return t


def rm_dir(path):
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def dcp_sd(model, opt):
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


model, opt = build(cfg["seed"])
out["tensors_per_rank"] = len(named_locals(model, opt)) + len(steps(opt))
if mode != "restore":
    set_values(model, opt)
state = {"model": model, "optim": opt}
out["job_bytes"] = job_bytes(model, opt)
reps = cfg["reps"] + 1  # the first repeat is a warm-up
order = lambda i, names: names[i % len(names):] + names[:i % len(names)]

if mode == "save":
    times = {"spotckpt": [], "dcp_fs": [], "dcp_spotckpt": []}
    with spotckpt.CheckpointManager(f"{work}/save-spot", keep_last=1, **KW) as mgr, \
            spotckpt.CheckpointManager(f"{work}/save-spotdcp", keep_last=1, **KW) as mgr_dcp:
        for i in range(reps):
            step = i + 1
            for m in order(i, list(times)):
                if m == "spotckpt":
                    t = timed(lambda: mgr.save(step, state, blocking=True), m)
                    mgr.wait()  # retention of the previous step, untimed
                elif m == "dcp_fs":
                    path = f"{work}/save-dcpfs-{step}"
                    t = timed(lambda: dcp.save(dcp_sd(model, opt), storage_writer=dcp.FileSystemWriter(path)), m)
                    rm_dir(path)
                else:
                    t = timed(lambda: dcp.save(dcp_sd(model, opt), storage_writer=sdcp.StorageWriter(mgr_dcp),
                                               checkpoint_id=step), m)
                    mgr_dcp.wait()
                times[m].append(t)
        if rank == 0:
            out["spotckpt_manifest_bytes"] = mgr.local.read_manifest(reps).total_bytes
            out["dcp_spotckpt_manifest_bytes"] = mgr_dcp.local.read_manifest(reps).total_bytes
    out["times"] = {k: v[1:] for k, v in times.items()}
elif mode == "stall":
    srcs = [dt.to_local() for _, dt in named_locals(model, opt)] + steps(opt)
    bufs = [torch.empty_like(s) for s in srcs]
    pg = dist.new_group(backend="gloo")  # DCP's background collectives get their own group

    def floor():
        for s, d in zip(srcs, bufs):
            d.copy_(s)

    times = {"floor": [], "spotckpt_async": [], "dcp_async": []}
    with spotckpt.CheckpointManager(f"{work}/stall-spot", keep_last=1, **KW) as mgr:
        for i in range(reps):
            step = i + 1
            for m in order(i, list(times)):
                if m == "floor":
                    t = timed(floor, m)
                elif m == "spotckpt_async":
                    t = timed(lambda: mgr.save(step, state), m)
                    mgr.wait()
                else:
                    path = f"{work}/stall-dcp-{step}"
                    res = []
                    t = timed(lambda: res.append(dcp.async_save(dcp_sd(model, opt), process_group=pg,
                                                                storage_writer=dcp.FileSystemWriter(path))), m)
                    getattr(res[0], "upload_completion", res[0]).result()
                    rm_dir(path)
                times[m].append(t)
    out["times"] = {k: v[1:] for k, v in times.items()}
elif mode == "save4":
    with spotckpt.CheckpointManager(f"{work}/r-spot", keep_last=None, **KW) as mgr:
        mgr.save(1, state, blocking=True)
    dcp.save(dcp_sd(model, opt), storage_writer=dcp.FileSystemWriter(f"{work}/r-dcpfs"))
    with spotckpt.CheckpointManager(f"{work}/r-spotdcp", keep_last=None, **KW) as mgr:
        dcp.save(dcp_sd(model, opt), storage_writer=sdcp.StorageWriter(mgr), checkpoint_id=1)
elif mode == "restore":
    want = [(dt, expected(name, dt)) for name, dt in named_locals(model, opt)]

    def clobber():
        with torch.no_grad():
            for dt, _ in want:
                dt.to_local().fill_(-7.0)
            for s in steps(opt):
                s.fill_(0.0)

    def correct():
        return all(torch.equal(dt.to_local(), w) for dt, w in want) and all(float(s) == 1.0 for s in steps(opt))

    times = {"spotckpt": [], "dcp_fs": [], "dcp_spotckpt": []}
    load_only = {"dcp_fs": [], "dcp_spotckpt": []}
    ok = {k: [] for k in times}
    with spotckpt.CheckpointManager(f"{work}/r-spot", keep_last=None, **KW) as mgr, \
            spotckpt.CheckpointManager(f"{work}/r-spotdcp", keep_last=None, **KW) as mgr_dcp:
        assert mgr.verify_on_restore and mgr_dcp.verify_on_restore

        def via_dcp(reader, part):
            sd = dcp_sd(model, opt)
            t0 = time.perf_counter()
            dcp.load(sd, storage_reader=reader)
            part.append(time.perf_counter() - t0)
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

        for i in range(reps):
            for m in order(i, list(times)):
                clobber()
                if correct():
                    raise SystemExit("clobber left the expected values in place")
                if m == "spotckpt":
                    got = []
                    t = timed(lambda: got.append(mgr.restore(state)), m)
                    assert got == [1], got
                elif m == "dcp_fs":
                    t = timed(lambda: via_dcp(dcp.FileSystemReader(f"{work}/r-dcpfs"), load_only[m]), m)
                else:
                    t = timed(lambda: via_dcp(sdcp.StorageReader(mgr_dcp), load_only[m]), m)
                times[m].append(t)
                ok[m].append(correct())
    out["times"] = {k: v[1:] for k, v in times.items()}
    out["load_only"] = {k: v[1:] for k, v in load_only.items()}
    out["correct"] = ok
out["gc_s"] = {k: v[1:] for k, v in gc_in_calls.items()}
print("result " + json.dumps(out), flush=True)
dist.barrier()  # gloo may abort at teardown after FSDP2 collectives (a torch issue): no finalizers
sys.stderr.flush()
os._exit(0)
'''


def run_job(mode: str, world: int, work: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    script = work / "worker.py"
    script.write_text(WORKER)
    from spotckpt.tools.simulate.process import free_port

    port = free_port()
    args = json.dumps({**cfg, "mode": mode, "work": str(work)})
    procs = []
    for r in range(world):
        e = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", SPOTCKPT_METRICS="0",
                 PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(script), args], env=e, stdout=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise SystemExit(f"{mode} x{world} failed (exit {p.returncode})")
        line = [ln for ln in out.splitlines() if ln.startswith("result ")][-1]
        outs.append(json.loads(line[7:]))
    return outs


def job_samples(outs: list[dict[str, Any]], method: str, key: str = "times") -> list[float]:
    """Per repeat, the slowest rank (a collective save/restore is done when every rank is)."""
    return [max(vals) for vals in zip(*(o[key][method] for o in outs))]


def gc_max(outs: list[dict[str, Any]], method: str) -> float:
    """The longest the cyclic garbage collector ran inside one timed call, any rank."""
    return max((x for o in outs for x in o["gc_s"].get(method, [])), default=0.0)


def worst_rank_median(outs: list[dict[str, Any]], method: str) -> float:
    return max(statistics.median(o["times"][method]) for o in outs)


def machine() -> dict[str, Any]:
    from spotckpt.tools.bench import cpu_model

    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"cpu_model": cpu_model(), "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "loadavg_start": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="fp32 parameters in MiB (the optimizer adds 2x)")
    ap.add_argument("--width", type=int, default=1024, help="in/out features of each nn.Linear layer")
    ap.add_argument("--ranks", type=int, default=2, help="ranks of the save and stall rows")
    ap.add_argument("--saves", type=int, default=9, help="timed saves per method (after one warm-up)")
    ap.add_argument("--restores", type=int, default=5, help="timed restores per method (after one warm-up)")
    ap.add_argument("--save-ranks", type=int, default=4, help="ranks that save the step the restore row reads")
    ap.add_argument("--restore-ranks", type=int, default=2, help="ranks that restore it (resharding)")
    ap.add_argument("--rows", default="save,stall,restore", help="a subset of save,stall,restore")
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: the system temp dir)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "sharded.json"))
    a = ap.parse_args()
    rows = set(a.rows.split(","))
    layers = max(1, round(a.mib * 2**20 / (4 * (a.width * a.width + a.width))))
    base = {"width": a.width, "layers": layers, "seed": 0}
    res: dict[str, Any] = {"machine": machine(), "args": vars(a), "layers": layers,
                           "param_bytes": layers * (a.width * a.width + a.width) * 4}
    lines = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sharded-", dir=a.dir) as d:
        work = Path(d)
        if "save" in rows:
            outs = run_job("save", a.ranks, work, {**base, "reps": a.saves})
            nbytes = outs[0]["job_bytes"]
            row: dict[str, Any] = {"ranks": a.ranks, "job_bytes": nbytes,
                                   "spotckpt_manifest_bytes": outs[0]["spotckpt_manifest_bytes"],
                                   "dcp_spotckpt_manifest_bytes": outs[0]["dcp_spotckpt_manifest_bytes"]}
            for m in ("spotckpt", "dcp_fs", "dcp_spotckpt"):
                s = job_samples(outs, m)
                row[m] = {"samples_s": s, "median_s": statistics.median(s),
                          "gb_per_s": nbytes / statistics.median(s) / 1e9, "gc_in_call_max_s": gc_max(outs, m)}
            row["spotckpt_over_dcp_fs"] = row["spotckpt"]["gb_per_s"] / row["dcp_fs"]["gb_per_s"]
            row["dcp_spotckpt_over_dcp_fs"] = row["dcp_spotckpt"]["gb_per_s"] / row["dcp_fs"]["gb_per_s"]
            res["durable_save"] = row
            say(f"durable save, {a.ranks} ranks, {nbytes / 2**20:.0f} MiB in the job (median of {a.saves}, "
                f"slowest rank): spotckpt {row['spotckpt']['gb_per_s']:.3f} GB/s, DCP FileSystemWriter "
                f"{row['dcp_fs']['gb_per_s']:.3f} GB/s, DCP + spotckpt.dcp.StorageWriter "
                f"{row['dcp_spotckpt']['gb_per_s']:.3f} GB/s; spotckpt / DCP = {row['spotckpt_over_dcp_fs']:.2f}x")
        if "stall" in rows:
            outs = run_job("stall", a.ranks, work, {**base, "reps": a.saves})
            row = {"ranks": a.ranks, "job_bytes": outs[0]["job_bytes"]}
            for m in ("floor", "spotckpt_async", "dcp_async"):
                row[m] = {"worst_rank_median_s": worst_rank_median(outs, m),
                          "per_rank_samples_s": [o["times"][m] for o in outs], "gc_in_call_max_s": gc_max(outs, m)}
            f = row["floor"]["worst_rank_median_s"]
            row["spotckpt_over_floor"] = row["spotckpt_async"]["worst_rank_median_s"] / f
            row["dcp_async_over_floor"] = row["dcp_async"]["worst_rank_median_s"] / f
            row["spotckpt_over_dcp_async"] = (row["spotckpt_async"]["worst_rank_median_s"]
                                              / row["dcp_async"]["worst_rank_median_s"])
            # the same ratio taken repeat by repeat (floor and save copied moments apart), less
            # exposed to other jobs' load changing between repeats
            row["spotckpt_over_floor_paired_median"] = statistics.median(
                s / f for s, f in zip(job_samples(outs, "spotckpt_async"), job_samples(outs, "floor")))
            res["async_stall"] = row
            say(f"async stall, {a.ranks} ranks, {row['job_bytes'] / a.ranks / 2**20:.0f} MiB per rank (worst rank's "
                f"median of {a.saves}): floor {f:.4f} s, spotckpt {row['spotckpt_async']['worst_rank_median_s']:.4f} s "
                f"({row['spotckpt_over_floor']:.2f}x floor; {row['spotckpt_over_floor_paired_median']:.2f}x repeat by repeat), DCP async_save {row['dcp_async']['worst_rank_median_s']:.4f} s "
                f"({row['dcp_async_over_floor']:.2f}x floor)")
        if "restore" in rows:
            run_job("save4", a.save_ranks, work, {**base, "reps": 0})
            outs = run_job("restore", a.restore_ranks, work, {**base, "seed": 1, "reps": a.restores})
            row = {"save_ranks": a.save_ranks, "restore_ranks": a.restore_ranks, "job_bytes": outs[0]["job_bytes"],
                   "page_cache": "warm"}
            for m in ("spotckpt", "dcp_fs", "dcp_spotckpt"):
                s = job_samples(outs, m)
                row[m] = {"samples_s": s, "median_s": statistics.median(s), "gc_in_call_max_s": gc_max(outs, m),
                          "correct_every_rank_every_repeat": all(all(o["correct"][m]) for o in outs)}
                if m != "spotckpt":
                    row[m]["dcp_load_only_median_s"] = statistics.median(job_samples(outs, m, "load_only"))
            row["spotckpt_over_dcp_fs"] = row["spotckpt"]["median_s"] / row["dcp_fs"]["median_s"]
            row["dcp_spotckpt_over_dcp_fs"] = row["dcp_spotckpt"]["median_s"] / row["dcp_fs"]["median_s"]
            res["restore"] = row
            bad = [m for m in ("spotckpt", "dcp_fs", "dcp_spotckpt") if not row[m]["correct_every_rank_every_repeat"]]
            say(f"restore {a.save_ranks} -> {a.restore_ranks} ranks, {row['job_bytes'] / 2**20:.0f} MiB (median of "
                f"{a.restores}, slowest rank, warm page cache): spotckpt (CRC32C verified) {row['spotckpt']['median_s']:.3f} s, "
                f"DCP FileSystemReader {row['dcp_fs']['median_s']:.3f} s, DCP + spotckpt.dcp.StorageReader "
                f"{row['dcp_spotckpt']['median_s']:.3f} s; spotckpt / DCP = {row['spotckpt_over_dcp_fs']:.2f}x; "
                + (f"WRONG VALUES after {bad}" if bad else "every element checked equal"))
            if bad:
                res["error"] = f"restored values differ from the saved ones: {bad}"
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["wall_s"] = time.perf_counter() - t_start
    print(render(res))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 1 if "error" in res else 0


def render(res: dict[str, Any]) -> str:
    """The rows as a markdown table (the figures of this run only)."""
    m = res["machine"]
    out = [f"{m['cpu_model']}, {m['cores']} cores, torch {m['torch']}; {res['param_bytes'] / 2**20:.0f} MiB of fp32 "
           f"parameters ({res['layers']} x nn.Linear({res['args']['width']}, {res['args']['width']})) + AdamW state", "",
           "| row | spotckpt | DCP | DCP + spotckpt.dcp | floor | spotckpt vs target |", "|---|---:|---:|---:|---:|---|"]
    if "durable_save" in res:
        r = res["durable_save"]
        out.append(f"| durable save, {r['ranks']} ranks, GB/s | {r['spotckpt']['gb_per_s']:.3f} | "
                   f"{r['dcp_fs']['gb_per_s']:.3f} | {r['dcp_spotckpt']['gb_per_s']:.3f} | | "
                   f"{r['spotckpt_over_dcp_fs']:.2f}x DCP (target >= 1.0x) |")
    if "async_stall" in res:
        r = res["async_stall"]
        out.append(f"| async stall, {r['ranks']} ranks, worst rank, s | {r['spotckpt_async']['worst_rank_median_s']:.4f} | "
                   f"{r['dcp_async']['worst_rank_median_s']:.4f} | | {r['floor']['worst_rank_median_s']:.4f} | "
                   f"{r['spotckpt_over_floor']:.2f}x floor (paired {r['spotckpt_over_floor_paired_median']:.2f}x; target <= 1.2x), "
                   f"{r['spotckpt_over_dcp_async']:.2f}x DCP |")
    if "restore" in res:
        r = res["restore"]
        out.append(f"| restore {r['save_ranks']} -> {r['restore_ranks']}, s | {r['spotckpt']['median_s']:.3f} | "
                   f"{r['dcp_fs']['median_s']:.3f} | {r['dcp_spotckpt']['median_s']:.3f} | | "
                   f"{r['spotckpt_over_dcp_fs']:.2f}x DCP (target <= 1.0x) |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
