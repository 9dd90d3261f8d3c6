"""Several ranks, side by side in one run: what a torch.distributed job pays for spotckpt.

    python benchmarks/bench_ranks.py [--mib 64] [--saves 5] [--ranks 1 2 4] [--out benchmarks/out/ranks.json]

Rows (each a real gloo job on 127.0.0.1, every rank its own local_dir, as separate hosts):
- per-rank async stall (median of ``--saves``) with the same per-rank state at 1, 2, 4 ranks,
  beside the floor of that many ranks each copying its state into a reused buffer at the same
  moment (ranks share the machine's memory bandwidth);
- bytes written per step by a DDP job: a replicated module of ``--mib`` MiB plus a small per-rank
  state, against 1x the module + the per-rank states (what "written once per job" means);
- maybe_save() per training step without a request (the preemption agreement's hot path), and
  with one rank's SIGTERM -> every rank's save of the agreed step;
- SIGTERM on one rank -> that step's manifest.json in S3 (SeaweedFS on 127.0.0.1), 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORKER = r'''
import json, os, signal, statistics, sys, time
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
import spotckpt
mode, local, mib, saves = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {"rank": rank, "world": world}
kw = dict(metrics=False, keep_last=2, every_steps=None)
if mode == "stall":
    st = {"w": torch.randn(mib * 2**18), "rng": spotckpt.RNGState()}  # per-rank state of mib MiB
    with spotckpt.CheckpointManager(local, **kw) as mgr:
        stalls = []
        for s in range(1, saves + 2):
            t0 = time.perf_counter(); mgr.save(s, st); stalls.append(time.perf_counter() - t0); mgr.wait()
        out["stall_s"] = statistics.median(stalls[1:])  # the first save allocates the buffer
elif mode == "floor":  # every rank copies its state into a reused buffer at the same moment
    src = torch.randn(mib * 2**18)
    dst = torch.empty_like(src)
    times = []
    for _ in range(saves + 1):
        dist.barrier()
        t0 = time.perf_counter(); dst.copy_(src); times.append(time.perf_counter() - t0)
    out["stall_s"] = statistics.median(times[1:])
elif mode == "ddp_bytes":
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(1024, mib * 256))  # ~mib MiB of fp32 weights
    st = {"model": model, "mine": torch.randn(1024), "rng": spotckpt.RNGState()}
    with spotckpt.CheckpointManager(local, **kw) as mgr:
        mgr.save(1, st, blocking=True)
        m = mgr.local.read_manifest(1)
        out["manifest_bytes"] = m.total_bytes
        out["module_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
elif mode == "hot_path":
    st = {"w": torch.zeros(4)}
    n = 20000
    with spotckpt.CheckpointManager(local, **kw) as mgr:
        for s in range(1, 200):
            mgr.maybe_save(s, st)
        t0 = time.perf_counter()
        for s in range(200, 200 + n):
            mgr.maybe_save(s, st)
        out["maybe_save_us"] = (time.perf_counter() - t0) / n * 1e6
elif mode == "sigterm_s3":
    st = {"w": torch.randn(mib * 2**18)}
    stop = []
    with spotckpt.CheckpointManager(local, s3_uri=os.environ["S3_URI"], **kw) as mgr:
        print("ready", flush=True)
        step = 0
        while True:
            step += 1
            time.sleep(0.01)
            mgr.maybe_save(step, st)
            if mgr.preempted:
                out["stopped_at"] = step
                out["t_done"] = time.time()
                break
print("result " + json.dumps(out), flush=True)
dist.destroy_process_group()
'''


def run_job(mode: str, world: int, mib: int, saves: int, work: Path, env: dict[str, str] | None = None,
            sigterm_rank: int | None = None) -> tuple[list[dict], float | None]:  # type: ignore[type-arg]
    script = work / "worker.py"
    script.write_text(WORKER)
    from spotckpt.tools.simulate.process import free_port

    port = free_port()
    procs = []
    for r in range(world):
        e = dict(os.environ, **(env or {}), RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SPOTCKPT_METRICS="0", PYTHONPATH=str(REPO))
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(work / f"{mode}-{world}-host{r}"),
                                       str(mib), str(saves)], env=e, stdout=subprocess.PIPE, text=True))
    t_sig = None
    if sigterm_rank is not None:
        p = procs[sigterm_rank]
        assert p.stdout is not None
        while p.stdout.readline().strip() != "ready":
            pass
        time.sleep(1.0)
        t_sig = time.time()
        p.send_signal(15)
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"{mode} x{world} failed (exit {p.returncode})")
        line = [ln for ln in out.splitlines() if ln.startswith("result ")][-1]
        outs.append(json.loads(line[7:]))
    return outs, t_sig


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="per-rank state (and DDP module) size in MiB")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-s3", action="store_true", help="skip the SIGTERM -> S3 row (needs SeaweedFS)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "ranks.json"))
    a = ap.parse_args()
    res: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version()}, "mib": a.mib}
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as d:
        work = Path(d)
        stall, floor = {}, {}
        for w in a.ranks:
            outs, _ = run_job("floor", w, a.mib, a.saves, work)
            floor[w] = max(o["stall_s"] for o in outs)
            outs, _ = run_job("stall", w, a.mib, a.saves, work)
            stall[w] = max(o["stall_s"] for o in outs)
            print(f"async stall, {a.mib} MiB per rank, {w} rank(s): worst rank {stall[w]:.4f} s; every rank "
                  f"copying at once (floor) {floor[w]:.4f} s; {stall[w] / floor[w]:.2f}x the floor", flush=True)
        base = stall[min(stall)]
        res["stall_s"] = stall
        res["copy_floor_s"] = floor
        res["stall_ratio_vs_1"] = {w: stall[w] / base for w in stall}
        res["stall_ratio_vs_floor"] = {w: stall[w] / floor[w] for w in stall}
        outs, _ = run_job("ddp_bytes", 2, a.mib, 1, work)
        res["ddp_bytes"] = {"manifest_total": outs[0]["manifest_bytes"], "module": outs[0]["module_bytes"],
                            "ratio_to_module": outs[0]["manifest_bytes"] / outs[0]["module_bytes"]}
        print(f"DDP, 2 ranks: {outs[0]['manifest_bytes']} bytes per step for a {outs[0]['module_bytes']}-byte "
              f"module ({res['ddp_bytes']['ratio_to_module']:.3f}x)", flush=True)  # type: ignore[index]
        hot = {}
        for w in (1, 2):
            outs, _ = run_job("hot_path", w, 1, 1, work)
            hot[w] = max(o["maybe_save_us"] for o in outs)
            print(f"maybe_save() per step without a request, {w} rank(s): {hot[w]:.1f} us", flush=True)
        res["maybe_save_us"] = hot
        res["maybe_save_share_of_10ms_step"] = {w: hot[w] / 10_000 for w in hot}
        if not a.no_s3:
            from spotckpt.tools.s3server import S3Server

            with S3Server.start("seaweedfs", work / "weed", buckets=["bench"]) as srv:
                outs, t_sig = run_job("sigterm_s3", 2, a.mib, 1, work, env={**srv.env(), "S3_URI": "s3://bench/job"},
                                      sigterm_rank=1)
                t_done = max(o["t_done"] for o in outs)
                res["sigterm_one_rank_to_s3_s"] = t_done - (t_sig or t_done)
                res["sigterm_stopped_at"] = [o["stopped_at"] for o in outs]
                print(f"SIGTERM on rank 1 -> step {outs[0]['stopped_at']} committed in S3 on every rank "
                      f"(2 x {a.mib} MiB): {res['sigterm_one_rank_to_s3_s']:.2f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
