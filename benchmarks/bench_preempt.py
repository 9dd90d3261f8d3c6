"""SIGTERM -> final checkpoint committed in S3: how long it takes for a 1 GiB fp32 state.

    python benchmarks/bench_preempt.py [--mb 1024] [--repeats 3] [--server seaweedfs|moto]

Starts a local S3 server on 127.0.0.1 in its own process (SeaweedFS, which verifies every
CRC32C, by default; ``--server moto`` for moto rows, labelled as such), then, per repeat, a trainer
child process holding ``--mb`` MiB of fp32 weights under
``CheckpointManager(local_dir, s3_uri=..., every_steps=10**9)`` that calls ``maybe_save`` every
step (so no policy save happens: the only checkpoint is the preemption one). At a random step the
parent sends SIGTERM and measures, from the moment of the signal:

- ``to_manifest_s``: until the final step's ``manifest.json`` exists in S3 (the parent polls
  ``list_objects_v2``; a step counts in S3 only once its manifest does);
- ``to_local_commit_s``: until the step is committed under the local dir (the rest is upload);
- ``to_exit_s``: until the child has exited (it must exit 0 after ``maybe_save`` returns with
  ``preempted`` set).

The committed step is then checked: it is the step the child reports as preempted, and
``S3Store.verify_step`` finds every object's size and full-object CRC32C right. Writes
benchmarks/out/preempt.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def child(local_dir: str, s3_uri: str, mb: int, step_seconds: float) -> int:
    """The trainer: a 1 GiB fp32 tensor changed every step, maybe_save every step."""
    import torch

    from spotckpt import CheckpointManager

    g = torch.Generator().manual_seed(0)
    state = {"weights": torch.randn(mb * 1024 * 1024 // 4, generator=g, dtype=torch.float32), "step": 0}
    with CheckpointManager(local_dir, s3_uri, every_steps=10**9, keep_last=2, metrics=False) as mgr:
        for step in range(1, 10**9):
            state["weights"][: 1 << 16].add_(1.0)  # "training": the state differs at every step
            state["step"] = step
            time.sleep(step_seconds)
            print(f"at {step}", flush=True)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                print(f"preempted {step}", flush=True)
                return 0
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=int(os.environ.get("MB", "1024")), help="state size in MiB (env MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--step-seconds", type=float, default=0.05, help="simulated compute per step")
    ap.add_argument("--min-step", type=int, default=3)
    ap.add_argument("--max-step", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--server", choices=("seaweedfs", "moto"), default="seaweedfs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "preempt.json"))
    ap.add_argument("--child", nargs=2, metavar=("LOCAL_DIR", "S3_URI"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.mb, args.step_seconds)

    rng = random.Random(args.seed)
    from spotckpt.tools.s3server import S3Server

    work = Path(tempfile.mkdtemp(prefix="bench-preempt-"))
    srv = S3Server.start(args.server, work / "server", buckets=["bench"])
    env = srv.apply_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.update(srv.apply_env())
    from spotckpt.format import MANIFEST_NAME, step_dirname
    from spotckpt.tools.bench import cpu_model
    from spotckpt.remote.s3 import MAX_CONCURRENCY, PART_SIZE_BYTES, S3Store

    s3 = srv.client()
    runs = []
    try:
        for r in range(args.repeats):
            prefix = f"run{r}"
            local = work / f"local{r}"
            log_path = work / f"child{r}.log"
            target = rng.randint(args.min_step, args.max_step)
            with open(log_path, "wb") as log_f:
                proc = subprocess.Popen(
                    [sys.executable, __file__, "--mb", str(args.mb), "--step-seconds", str(args.step_seconds),
                     "--child", str(local), f"s3://bench/{prefix}"],
                    stdout=subprocess.PIPE, stderr=log_f, text=True, env=env,
                )
                assert proc.stdout is not None
                line = ""
                while line != f"at {target}":
                    line = proc.stdout.readline().strip()
                    if not line and proc.poll() is not None:
                        raise SystemExit(f"trainer exited early ({proc.returncode}); see {log_path}:\n{log_path.read_text()}")
                proc.send_signal(signal.SIGTERM)
                t0 = time.perf_counter()
                t_manifest = t_local = None
                man_key = None
                while t_manifest is None:
                    if t_local is None and local.is_dir() and any(p.name.startswith("step-") for p in local.iterdir()):
                        t_local = time.perf_counter() - t0  # committed locally: the rest is the upload
                    for o in s3.list_objects_v2(Bucket="bench", Prefix=f"{prefix}/").get("Contents", []):
                        if o["Key"].endswith("/" + MANIFEST_NAME):
                            t_manifest, man_key = time.perf_counter() - t0, o["Key"]
                            break
                    if t_manifest is None:
                        if proc.poll() is not None:
                            break
                        time.sleep(0.02)
                out, _ = proc.communicate(timeout=300)
                t_exit = time.perf_counter() - t0
            preempted = [int(x.split()[1]) for x in out.splitlines() if x.startswith("preempted ")]
            if proc.returncode != 0 or not preempted or man_key is None:
                raise SystemExit(f"run {r}: exit {proc.returncode}, preempted {preempted}, manifest {man_key}; see {log_path}:\n{log_path.read_text()[-4000:]}")
            final = preempted[0]
            if man_key != f"{prefix}/{step_dirname(final)}/{MANIFEST_NAME}":
                raise SystemExit(f"run {r}: manifest {man_key} is not the final step {final}")
            with S3Store(f"s3://bench/{prefix}") as store:
                problems = store.verify_step(final)
                nbytes = store.read_manifest(final).total_bytes
            if problems:
                raise SystemExit(f"run {r}: step {final} in S3 fails verification: {problems}")
            runs.append({"sigterm_at_step": target, "final_step": final, "bytes": nbytes,
                         "to_local_commit_s": None if t_local is None else round(t_local, 3),
                         "to_manifest_s": round(t_manifest, 3), "to_exit_s": round(t_exit, 3), "exit_code": proc.returncode})
            print(f"repeat {r + 1}/{args.repeats}: SIGTERM at step {target}, final step {final} "
                  f"({nbytes / 1e6:.0f} MB): committed locally after {t_local or float('nan'):.2f} s, manifest in S3 "
                  f"after {t_manifest:.2f} s, exit 0 after {t_exit:.2f} s", flush=True)
            shutil.rmtree(local, ignore_errors=True)
            for o in s3.list_objects_v2(Bucket="bench", Prefix=f"{prefix}/").get("Contents", []):
                s3.delete_object(Bucket="bench", Key=o["Key"])
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)

    tm = [x["to_manifest_s"] for x in runs]
    te = [x["to_exit_s"] for x in runs]
    tl = [x["to_local_commit_s"] for x in runs if x["to_local_commit_s"] is not None]
    summary = {
        "to_local_commit_s": {"median": statistics.median(tl), "min": min(tl), "max": max(tl)} if tl else None,
        "to_manifest_s": {"median": statistics.median(tm), "min": min(tm), "max": max(tm)},
        "to_exit_s": {"median": statistics.median(te), "min": min(te), "max": max(te)},
    }
    print(f"\nSIGTERM -> final {args.mb} MiB step's manifest.json in S3: median {summary['to_manifest_s']['median']:.2f} s "
          f"(min {min(tm):.2f}, max {max(tm):.2f})")
    if tl:
        print(f"SIGTERM -> step committed locally:          median {statistics.median(tl):.2f} s (the rest is the upload)")
    print(f"SIGTERM -> trainer exit 0:                  median {summary['to_exit_s']['median']:.2f} s (min {min(te):.2f}, max {max(te):.2f})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "state_mib": args.mb, "repeats": args.repeats, "summary": summary, "runs": runs,
        "spotckpt_part_size_bytes": PART_SIZE_BYTES, "spotckpt_concurrency": MAX_CONCURRENCY,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(), "python": platform.python_version()},
        "server": f"{args.server} on 127.0.0.1, its own process" + (" (moto: not a performance reference)" if args.server == "moto" else ""),
    }, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
