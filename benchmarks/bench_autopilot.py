"""Checkpoint policies compared on the same interruptions: AutoInterval against fixed intervals.

    python benchmarks/bench_autopilot.py [--seeds 1] [--first-seed 0] [--every-steps 100] [--schedules noticed,hard30,unfit]
                                         [--grid 'noticed=8,16,32;hard30=5,10,20'] [--scale 1.0] [--dry]

Each run is ``spotckpt simulate --json --interrupt-every-steps N --step-seconds T
--hard-kill-fraction F --seed K`` of ``examples/train_toy.py --save-policy P`` (compressed time: ~15
ms steps, an interruption every ~N = 100 steps). The interruptions are drawn in *training steps* for
the seed: every policy run with a seed meets the same interruptions, of the same kinds (with or
without notice), at the same training steps (or a poll, ~50 ms, later), however much work it lost --
so the comparison is paired, and a policy that wastes more does not meet more interruptions. ``T``
is the trainer's step time, measured once before the runs (train_toy, 2 MiB saved locally every 25
steps, no S3; it also prints each schedule's Young/Daly optimum in steps from the stall measured
there, to check that the grid brackets it): simulate tells the trainer
``SPOTCKPT_INTERRUPTIONS=per_hour=3600/(N*T)``, the same rate for every policy. Runs are interleaved
(seed by seed, policy by policy), so a load change on the machine hits all policies.

Schedules (``steps``: the run's length at ``--scale 1``; a longer run is more interruptions, as
another seed would be -- longest where failures are rarest):

- ``noticed``: 10 % of the interruptions without notice, the final save fits the grace (5 s);
  3600 steps, ~36 interruptions, ~3.6 without notice per run;
- ``hard30``:  30 % without notice; 1200 steps, ~12 interruptions, ~3.6 without notice;
- ``unfit``:   10 % without notice, a state (16 MiB) whose final save does not fit a 0.1 s grace,
  so *every* interruption loses work; 600 steps, ~6 interruptions.

Policies: ``every:N`` for a grid of N per schedule around its Young/Daly optimum on the 2-core VM
(quiet: ~15 ms steps, ~2.4 ms stalls; ``--grid`` overrides it, and the calibration prints the
optimum in steps on the machine at hand); ``auto`` (AutoInterval); ``young-daly`` (Young/Daly from the
total interruption rate, ignoring notice: the interval a user would pick from the rate).

Compared: the policy-dependent waste, **checkpoint stalls + lost work**, summed over all runs of a
policy (the same interruptions for every policy: a sum is the waste of that set of interruptions; a
median of per-run figures would throw away the runs' different numbers of failures). "lost steps"
counts the lost work in training steps: at the same interruption steps it depends only on where each
policy's saves fell, not on how slow the machine was at that moment. "instances ran" (the time the
trainer processes ran, restarts included) is beside it: it also holds what the stalls miss --
training slowed by saves persisting and uploading in the background -- but varies with the machine's
load far more than the policies differ, so only a quiet machine makes it comparable. Restart +
restore is the same for every policy (the same interruptions, a restore of the same size) and
dominated by the trainer's start (Python and torch imports) -- reported, not compared. The standard
error of a sum is estimated from its failures (interruptions that lost work): ``sqrt(k) * sd(lost
seconds per failure)`` -- the lost work of a failure depends on where it falls between two saves,
the stalls barely vary; a ratio's from both sums'. Before the runs the benchmark prints the expected
number of failures per policy and the relative standard error they allow (``0.6 / sqrt(k)`` for the
lost work: lost work per failure is about uniform over an interval, plus the time to durable; about
half that for stalls + lost work). Checks: every policy met the same interruptions; 0 noticed
interruptions lost work while the trainer's grace budget said the final save fits; in ``unfit``, the
budget said "does not fit" (the trainer warned) before the first interruption. And the per-step cost
of ``maybe_save`` with ``auto`` against ``every_steps=500`` (in-process, no save due).

Writes benchmarks/out/autopilot.json after every seed (every run's figures and interruptions; a run
cut short keeps its complete seeds) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
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
    "noticed": {"hard": 0.1, "grace": 5.0, "state_mb": 2.0, "steps": 3600, "grid": (8, 16, 32)},
    "hard30": {"hard": 0.3, "grace": 5.0, "state_mb": 2.0, "steps": 1200, "grid": (5, 10, 20)},
    "unfit": {"hard": 0.1, "grace": 0.1, "state_mb": 16.0, "steps": 600, "grid": (12, 25, 50)},
}
CV_PER_FAILURE = 0.6  # sd / mean of the lost work of one failure (about uniform over an interval, + D)


def toy(steps: int, step_sleep: float, policy: str | None, state_mb: float, print_every: int = 1000000) -> list[str]:
    cmd = [sys.executable, str(REPO / "examples" / "train_toy.py"), "--steps", str(steps), "--step-sleep",
           str(step_sleep), "--state-mb", str(state_mb), "--print-every", str(print_every)]
    return cmd + (["--save-policy", policy] if policy else ["--every-steps", "1000000"])


def calibrate(step_sleep: float, steps: int = 600) -> tuple[float, float]:
    """train_toy (2 MiB, local saves every 25 steps, no S3): (seconds per training step, the median
    over 50-step spans; the mean save stall, its first save dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTCKPT_")}
    with tempfile.TemporaryDirectory() as d:
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", SPOTCKPT_METRICS="0",
                   SPOTCKPT_EVENTS_FILE=str(Path(d) / "events.jsonl"))
        proc = subprocess.Popen([*toy(steps, step_sleep, "every:25", 2.0, print_every=50), "--local-dir", d],
                                env=env, stdout=subprocess.PIPE, text=True, cwd=d)
        seen: list[tuple[int, float]] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("train_toy: step "):
                seen.append((int(line.split()[2]), time.monotonic()))
        proc.wait()
        events = [json.loads(x) for x in (Path(d) / "events.jsonl").read_text().splitlines() if x.strip()]
    stalls = [e["stall_s"] for e in events if e.get("event") == "save" and not e.get("blocking")][1:]
    spans = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(seen[1:], seen[2:])]  # skip the warm-up span
    return statistics.median(spans), statistics.fmean(stalls) if stalls else float("nan")


def optimum_steps(schedule: str, args: argparse.Namespace, step_s: float, stall_s: float) -> str:
    """Young/Daly's interval in steps for the schedule (what ``auto`` should land near)."""
    sc = SCHEDULES[schedule]
    every_s = args.every_steps * step_s
    rate = 1 / every_s if schedule == "unfit" else sc["hard"] / every_s  # unfit: every interruption loses work
    t = math.sqrt(2 * stall_s / rate)
    more = " (or the pipeline bound, 1.5 x time to durable, if longer: 16 MiB uploads)" if schedule == "unfit" else ""
    return (f"{schedule}: Young/Daly sqrt(2CM) = {t:.3g} s = ~{t / step_s:.0f} steps{more}; "
            f"grid {policies_of(schedule, args)}")


def run_one(schedule: str, policy: str, seed: int, args: argparse.Namespace, step_s: float) -> dict:
    sc = SCHEDULES[schedule]
    steps = max(args.every_steps, int(round(sc["steps"] * args.scale)))
    cmd = [sys.executable, "-m", "spotckpt.tools.simulate", "--json", "--interrupt-every-steps", str(args.every_steps),
           "--step-seconds", f"{step_s:.6g}", "--hard-kill-fraction", str(sc["hard"]), "--seed", str(seed),
           "--grace", str(sc["grace"]), "--restart-delay", "0.1", "--total-steps", str(steps), "--",
           *toy(steps, args.step_sleep, policy, sc["state_mb"])]
    env = dict(os.environ, PYTHONPATH=str(REPO), SPOTCKPT_METRICS="0")
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
    wall = time.monotonic() - t0
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return {"schedule": schedule, "policy": policy, "seed": seed, "error": (out.stderr or out.stdout)[-2000:]}
    w = doc["wasted_seconds"]
    its = doc["interruptions"]
    noticed = [i for i in its if i["notice"]]
    failures = [i for i in its if (i["lost_seconds"] or 0) > 0 or not i["notice"]]
    first = its[0]["elapsed_seconds"] if its else None
    unfit_at = doc.get("grace_budget_unfit_elapsed_seconds")
    return {
        "schedule": schedule, "policy": policy, "seed": seed, "steps": steps, "outcome": doc["outcome"],
        "wall_s": round(wall, 2), "interruptions": len(its), "without_notice": doc["interruptions_without_notice"],
        "stalls_s": w["checkpoint_stalls"], "lost_s": w["lost_work"], "restart_s": w["restart_restore"],
        "lost_steps": doc["lost_steps_total"],
        "instance_s": doc["instance_seconds"], "wasted_s": w["total"],
        "policy_wasted_s": round(w["checkpoint_stalls"] + w["lost_work"], 3),
        # every interruption that lost work, and where each one landed (the same for every policy)
        "failures_lost_s": [i["lost_seconds"] or 0.0 for i in failures],
        "failures_lost_steps": [i["lost_steps"] or 0 for i in failures],
        "at": [[i["step_at_interruption"], int(i["notice"])] for i in its],
        "misses_fits_busy": sum(1 for i in noticed if i["grace_budget_fits_busy"] and (i["lost_steps"] or 0) > 0),
        "misses_fits_idle": sum(1 for i in noticed if i["grace_budget_fits"] and (i["lost_steps"] or 0) > 0),
        "noticed_with_fit_budget": sum(1 for i in noticed if i["grace_budget_fits_busy"]),
        "warned_before_first": None if first is None else (unfit_at is not None and unfit_at < first),
        "final_step": doc["final_step"],
    }


def hot_path(n: int = 50000) -> dict:
    """Seconds per maybe_save() call when no save is due: every_steps=500 against auto, counting
    seconds (its step time not measured yet) and counting steps (the usual case once it is)."""
    import torch

    from spotckpt import CheckpointManager
    from spotckpt.policy import AutoInterval

    out = {}
    state = {"w": torch.zeros(1024)}
    for name in ("every_steps=500", "auto, counting seconds", "auto, counting steps", "every_steps=500 (again)",
                 "auto, counting seconds (again)", "auto, counting steps (again)"):
        policy = AutoInterval() if name.startswith("auto") else None
        kw = {"save_policy": policy} if policy is not None else {"every_steps": 500}
        with tempfile.TemporaryDirectory() as d:
            with CheckpointManager(d, None, metrics=False, install_signal_handlers=False, **kw) as mgr:
                mgr.save(1, state, blocking=True)  # auto: costs measured, interval planned (hours: never due)
                if policy is not None and "steps" in name:
                    assert policy._pilot is not None  # bound by the manager
                    policy._pilot.note_step_time(1e-4)  # as a due save would: now the plan is counted in steps
                    policy.replan()
                    assert policy.interval_steps is not None
                mgr.maybe_save(2, state)
                t0 = time.perf_counter()
                for step in range(3, n + 3):
                    if step % 500 == 0:
                        continue
                    mgr.maybe_save(step, state)
                out[name] = (time.perf_counter() - t0) / n
    return out


def policies_of(schedule: str, args: argparse.Namespace) -> list[str]:
    """``--grid 8,16,32`` (every schedule) or ``noticed=8,16,32;hard30=5,10,20`` (those named)."""
    grid = SCHEDULES[schedule]["grid"]
    for part in (args.grid or "").split(";"):
        name, _, values = part.rpartition("=")
        if values and name in ("", schedule):
            grid = tuple(int(x) for x in values.split(","))
    every = [f"every:{n}" for n in grid] + ["auto", "young-daly"]
    only = getattr(args, "policies", None)
    return [p for p in every if not only or p in only.split(",")]


def expected(schedule: str, args: argparse.Namespace) -> str:
    sc = SCHEDULES[schedule]
    steps = max(args.every_steps, int(round(sc["steps"] * args.scale)))
    n = args.seeds * (steps / args.every_steps - 1)
    k = n if schedule == "unfit" else n * sc["hard"]
    se = CV_PER_FAILURE / math.sqrt(max(k, 1))
    return (f"{schedule}: ~{n:.0f} interruptions per policy, ~{k:.0f} that lose work -> expected relative "
            f"standard error of a policy's summed lost work ~{se:.0%}, of stalls + lost work ~{se / 2:.0%} "
            "(about half stalls near the optimum)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed+seeds-1 (to add "
                    "seeds to an earlier run: merge the JSONs with from_json)")
    ap.add_argument("--every-steps", type=int, default=100, help="mean training steps between interruptions")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every schedule's run length")
    ap.add_argument("--grid", default=None, help="fixed intervals (steps): 8,16,32 for every schedule, or "
                    "noticed=8,16,32;hard30=5,10,20 (default: per schedule, see SCHEDULES)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--policies", default=None, help="run only these (e.g. auto: a changed AutoInterval on the seeds "
                    "of an earlier run, merged with from_json(..., renamed=...))")
    ap.add_argument("--step-sleep", type=float, default=0.01)
    ap.add_argument("--step-seconds", type=float, default=None, help="the nominal step time (default: measured)")
    ap.add_argument("--dry", action="store_true", help="calibrate and print what the runs would be, run nothing")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "autopilot.json"))
    args = ap.parse_args()
    schedules = args.schedules.split(",")
    hp = hot_path()
    print("maybe_save() per call, no save due:", {k: f"{v * 1e6:.2f} us" for k, v in hp.items()}, flush=True)
    step_s, stall_s = calibrate(args.step_sleep)
    if args.step_seconds is not None:
        step_s = args.step_seconds
    print(f"nominal step time {step_s * 1e3:.2f} ms (told rate: one interruption per "
          f"{args.every_steps * step_s:.3g} s of training); mean stall of a 2 MiB save {stall_s * 1e3:.2f} ms",
          flush=True)
    for sc in schedules:
        print(expected(sc, args), flush=True)
        print(optimum_steps(sc, args, step_s, stall_s), flush=True)
    if args.dry:
        return 0
    runs: list[dict] = []
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for sc in schedules:
            for pol in policies_of(sc, args):
                r = run_one(sc, pol, seed, args, step_s)
                runs.append(r)
                print(json.dumps({k: v for k, v in r.items() if k not in ("at", "failures_lost_s")}), flush=True)
        # after every seed: a run cut short keeps its complete seeds (a stop that does not depend on the results)
        Path(args.out).write_text(json.dumps({"machine": dict(machine, loadavg=os.getloadavg()), "hot_path_s": hp,
                                              "step_seconds": step_s, "calibration_stall_s": stall_s, "runs": runs,
                                              "seeds_done": sorted({r["seed"] for r in runs}),
                                              "schedules": SCHEDULES, "args": vars(args)}, indent=1))
    print(table(runs, schedules, {sc: policies_of(sc, args) for sc in schedules}))
    return 0


def from_json(*paths: str, renamed: dict[str, dict[str, str]] | None = None) -> str:
    """The table of saved runs, merged (``python -c 'import bench_autopilot as b; print(b.from_json(P, ...))'``:
    runs of other seeds with the same schedules and policies add failures to the same sums).
    ``renamed``: per file, policies to show under another name -- e.g. ``{P: {"auto": "auto-seconds"}}``
    for the runs of an earlier AutoInterval, beside a file of ``--policies auto`` runs of the same seeds."""
    runs = [dict(r, policy=(renamed or {}).get(p, {}).get(r["policy"], r["policy"]))
            for p in paths for r in json.loads(Path(p).read_text())["runs"]]
    seeds = [(r["schedule"], r["policy"], r["seed"]) for r in runs]
    if len(seeds) != len(set(seeds)):
        raise SystemExit("from_json: the files share a seed; give each run its own --first-seed")
    schedules = list(dict.fromkeys(r["schedule"] for r in runs))
    return table(runs, schedules, {sc: list(dict.fromkeys(r["policy"] for r in runs if r["schedule"] == sc))
                                   for sc in schedules})


def _sum_se(rs: list[dict]) -> tuple[float, float]:
    """A policy's summed stalls + lost work, and its standard error (from the failures' spread)."""
    total = sum(r["policy_wasted_s"] for r in rs)
    lost = [x for r in rs for x in r["failures_lost_s"]]
    se = math.sqrt(len(lost)) * statistics.stdev(lost) if len(lost) > 1 else float("nan")
    return total, se


def same_interruptions(rs: list[dict]) -> str:
    """Whether every policy met the same interruptions (kinds; steps up to the poll's lag)."""
    by_seed: dict[int, list[list[list[int]]]] = {}
    for r in rs:
        by_seed.setdefault(r["seed"], []).append(r["at"])
    lag, same = 0, True
    for ats in by_seed.values():
        kinds = {tuple(k for _, k in a) for a in ats}
        same &= len(kinds) == 1
        if same:
            for i in range(len(ats[0])):
                steps = [a[i][0] for a in ats]
                lag = max(lag, max(steps) - min(steps))
    return f"same interruptions for every policy: {'yes' if same else 'NO'} (steps differ by <= {lag})"


def table(runs: list[dict], schedules: list[str], policies: dict[str, list[str]]) -> str:
    lines = ["| schedule | policy | stalls + lost work, s (sum +- SE) | stalls, s | lost work, s | lost steps | "
             "failures | interruptions (no notice) | restart + restore, s | instances ran, s | misses |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for sc in schedules:
        tot: dict[str, tuple[float, float]] = {}
        for pol in policies[sc]:
            rs = [r for r in runs if r["schedule"] == sc and r["policy"] == pol and "error" not in r]
            if not rs:
                continue
            tot[pol] = _sum_se(rs)
            lines.append(f"| {sc} | {pol} | {tot[pol][0]:.2f} +- {tot[pol][1]:.2f} | "
                         f"{sum(r['stalls_s'] for r in rs):.2f} | {sum(r['lost_s'] for r in rs):.2f} | "
                         f"{sum(r.get('lost_steps', 0) for r in rs)} | "
                         f"{sum(len(r['failures_lost_s']) for r in rs)} | "
                         f"{sum(r['interruptions'] for r in rs)} ({sum(r['without_notice'] for r in rs)}) | "
                         f"{sum(r['restart_s'] for r in rs):.1f} | {sum(r['instance_s'] for r in rs):.1f} | "
                         f"{sum(r['misses_fits_busy'] for r in rs)} |")
        errors = [r for r in runs if r["schedule"] == sc and "error" in r]
        fixed = {p: v for p, v in tot.items() if p.startswith("every:")}
        note = f"{sc}: {same_interruptions([r for r in runs if r['schedule'] == sc and 'error' not in r])}"
        if fixed:
            best = min(fixed, key=lambda p: fixed[p][0])
            note += f"; best fixed in hindsight {best} ({fixed[best][0]:.2f} s)"
            for auto in (p for p in tot if p.startswith("auto")):  # auto, and an earlier version's (renamed)
                note += f"; {auto} {tot[auto][0]:.2f} s = {_ratio(tot[auto], fixed[best])} best"
                if "young-daly" in tot:
                    note += f", {_ratio(tot[auto], tot['young-daly'])} young-daly ({tot['young-daly'][0]:.2f} s)"
        if sc == "unfit":
            warned = [r["warned_before_first"] for r in runs if r["schedule"] == sc
                      and r.get("warned_before_first") is not None]
            note += f"; warned before the first interruption in {sum(warned)} of {len(warned)} runs"
        if errors:
            note += f"; {len(errors)} run(s) FAILED (see the JSON)"
        notes.append(note)
    return "\n".join(lines + [""] + notes)


def _ratio(a: tuple[float, float], b: tuple[float, float]) -> str:
    if b[0] <= 0:
        return "n/a x"
    r = a[0] / b[0]
    se = r * math.sqrt((a[1] / a[0]) ** 2 + (b[1] / b[0]) ** 2) if a[0] > 0 else float("nan")
    return f"{r:.2f}x (+- {se:.2f})"


if __name__ == "__main__":
    sys.exit(main())
