"""Checkpoint policies compared on the same interruptions: AutoInterval against fixed intervals.

    python benchmarks/bench_autopilot.py [--seeds 3] [--steps 1200] [--grid 10,40] [--schedules noticed,hard30,unfit]

Each run is ``spotckpt simulate --json --interrupt-every S --hard-kill-fraction F --seed K`` of
``examples/train_toy.py --save-policy P`` (compressed time: a few seconds between interruptions,
~10 ms steps). Every policy sees the same seeded schedules (same seeds, same draws); the runs are
interleaved (seed by seed, policy by policy) so a load change on the machine hits all policies.

Schedules (``--interrupt-every`` is per seconds of training; simulate tells the trainer the rate
through ``$SPOTCKPT_INTERRUPTIONS``, so AutoInterval is told what the schedule does):

- ``noticed``: 10 % of the interruptions without notice, the final save fits the grace;
- ``hard30``:  30 % without notice;
- ``unfit``:   10 % without notice, a state (16 MiB) whose final save does not fit a 0.1 s grace.

Policies: ``every:N`` for each N of ``--grid``; ``auto`` (AutoInterval); ``young-daly`` (Young/Daly
from the total interruption rate, ignoring notice: the interval a user would pick from the rate).

The schedules are the same draws for every policy, but in *time*: a policy that loses more work
runs longer and meets more interruptions, so the table also gives the waste per interruption.

Per run: wasted time (simulate's split: checkpoint stalls, lost work, restart + restore). The
policy-dependent part is stalls + lost work: restart + restore is the same for every policy (the
same interruptions, a restore of the same size) and dominated here by the trainer's start (Python
and torch imports) -- it is reported, not compared. Checks: 0 noticed interruptions lost work
while the trainer's grace budget said the final save fits (busy or not); in ``unfit``, the budget
said "does not fit" (the trainer warned) before the first interruption. And the per-step cost of
``maybe_save`` with ``auto`` against ``every_steps=500`` (in-process, no save due).

Writes benchmarks/out/autopilot.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SCHEDULES = {
    "noticed": {"every": 3.0, "hard": 0.1, "grace": 5.0, "state_mb": 2.0},
    "hard30": {"every": 3.0, "hard": 0.3, "grace": 5.0, "state_mb": 2.0},
    "unfit": {"every": 3.0, "hard": 0.1, "grace": 0.1, "state_mb": 16.0},
}


def run_one(schedule: str, policy: str, seed: int, steps: int, step_sleep: float) -> dict:
    sc = SCHEDULES[schedule]
    cmd = [sys.executable, "-m", "spotckpt.tools.simulate", "--json", "--interrupt-every", str(sc["every"]),
           "--hard-kill-fraction", str(sc["hard"]), "--seed", str(seed), "--grace", str(sc["grace"]),
           "--restart-delay", "0.1", "--total-steps", str(steps), "--",
           sys.executable, str(REPO / "examples" / "train_toy.py"), "--steps", str(steps),
           "--step-sleep", str(step_sleep), "--save-policy", policy, "--state-mb", str(sc["state_mb"]),
           "--print-every", "1000000"]
    env = dict(os.environ, PYTHONPATH=str(REPO), SPOTCKPT_METRICS="0")
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tempfile.gettempdir())
    wall = time.monotonic() - t0
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return {"schedule": schedule, "policy": policy, "seed": seed, "error": (out.stderr or out.stdout)[-2000:]}
    w = doc["wasted_seconds"]
    its = doc["interruptions"]
    noticed = [i for i in its if i["notice"]]
    misses = [i for i in noticed if i["grace_budget_fits_busy"] and (i["lost_steps"] or 0) > 0]
    misses_idle = [i for i in noticed if i["grace_budget_fits"] and (i["lost_steps"] or 0) > 0]
    first = its[0]["elapsed_seconds"] if its else None
    unfit_at = doc.get("grace_budget_unfit_elapsed_seconds")
    return {
        "schedule": schedule, "policy": policy, "seed": seed, "outcome": doc["outcome"], "wall_s": round(wall, 2),
        "interruptions": len(its), "without_notice": doc["interruptions_without_notice"],
        "stalls_s": w["checkpoint_stalls"], "lost_s": w["lost_work"], "restart_s": w["restart_restore"],
        "wasted_s": w["total"], "policy_wasted_s": round(w["checkpoint_stalls"] + w["lost_work"], 3),
        "noticed": len(noticed), "misses_fits_busy": len(misses), "misses_fits_idle": len(misses_idle),
        "noticed_with_fit_budget": sum(1 for i in noticed if i["grace_budget_fits_busy"]),
        "warned_before_first": None if first is None else (unfit_at is not None and unfit_at < first),
        "final_step": doc["final_step"],
    }


def hot_path(n: int = 50000) -> dict:
    """Seconds per maybe_save() call when no save is due: every_steps=500 against auto."""
    import torch

    from spotckpt import CheckpointManager

    out = {}
    state = {"w": torch.zeros(1024)}
    for name, kw in (("every_steps=500", {"every_steps": 500}), ("auto", {"every_steps": "auto"}),
                     ("every_steps=500 (again)", {"every_steps": 500}), ("auto (again)", {"every_steps": "auto"})):
        with tempfile.TemporaryDirectory() as d:
            with CheckpointManager(d, None, metrics=False, install_signal_handlers=False, **kw) as mgr:
                mgr.save(1, state, blocking=True)  # auto: costs measured, interval planned (hours: never due)
                mgr.maybe_save(2, state)
                t0 = time.perf_counter()
                for step in range(3, n + 3):
                    if step % 500 == 0:
                        continue
                    mgr.maybe_save(step, state)
                out[name] = (time.perf_counter() - t0) / n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--grid", default="10,40", help="fixed intervals (steps) to compare")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--steps", type=int, default=1200)  # ~15 s of training at 10 ms: 4-8 interruptions a run
    ap.add_argument("--step-sleep", type=float, default=0.01)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "autopilot.json"))
    args = ap.parse_args()
    policies = [f"every:{n}" for n in args.grid.split(",")] + ["auto", "young-daly"]
    schedules = args.schedules.split(",")
    hp = hot_path()
    print("maybe_save() per call, no save due:", {k: f"{v * 1e6:.2f} us" for k, v in hp.items()}, flush=True)
    runs = []
    for seed in range(args.seeds):
        for sc in schedules:
            for pol in policies:
                r = run_one(sc, pol, seed, args.steps, args.step_sleep)
                runs.append(r)
                print(json.dumps(r), flush=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "hot_path_s": hp, "runs": runs,
                                          "schedules": SCHEDULES, "args": vars(args)}, indent=1))
    print(table(runs, schedules, policies))
    return 0


def from_json(path: str) -> str:
    """The table of a saved run (``python -c 'import bench_autopilot as b; print(b.from_json(P))'``)."""
    doc = json.loads(Path(path).read_text())
    runs = doc["runs"]
    return table(runs, list(dict.fromkeys(r["schedule"] for r in runs)), list(dict.fromkeys(r["policy"] for r in runs)))


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "n/a"


def table(runs: list[dict], schedules: list[str], policies: list[str]) -> str:
    lines = ["| schedule | policy | stalls + lost work, s | per interruption, s | stalls, s | lost work, s | "
             "restart + restore, s | interruptions (no notice) | misses |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for sc in schedules:
        med = {}
        for pol in policies:
            rs = [r for r in runs if r["schedule"] == sc and r["policy"] == pol and "error" not in r]
            if not rs:
                continue
            med[pol] = statistics.median(r["policy_wasted_s"] for r in rs)
            per = [r["policy_wasted_s"] / max(1, r["interruptions"]) for r in rs]
            lines.append(f"| {sc} | {pol} | {_spread([r['policy_wasted_s'] for r in rs])} | {_spread(per)} | "
                         f"{_spread([r['stalls_s'] for r in rs])} | {_spread([r['lost_s'] for r in rs])} | "
                         f"{_spread([r['restart_s'] for r in rs])} | "
                         f"{sum(r['interruptions'] for r in rs)} ({sum(r['without_notice'] for r in rs)}) | "
                         f"{sum(r['misses_fits_busy'] for r in rs)} |")
        fixed = {p: v for p, v in med.items() if p.startswith("every:")}
        if fixed and "auto" in med:
            best = min(fixed, key=fixed.__getitem__)
            note = (f"{sc}: best fixed in hindsight {best} ({fixed[best]:.2f} s); auto {med['auto']:.2f} s = "
                    f"{med['auto'] / fixed[best]:.2f}x best" if fixed[best] > 0 else f"{sc}: best fixed {best} (0 s)")
            if "young-daly" in med and med["young-daly"] > 0:
                note += f", {med['auto'] / med['young-daly']:.2f}x young-daly ({med['young-daly']:.2f} s)"
            warned = [r["warned_before_first"] for r in runs if r["schedule"] == sc
                      and r.get("warned_before_first") is not None]
            if sc == "unfit":
                note += f"; warned before the first interruption in {sum(warned)} of {len(warned)} runs"
            notes.append(note)
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    sys.exit(main())
