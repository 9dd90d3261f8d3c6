"""What bench_autopilot's ``noticed`` comparison looks like in expectation, and how often a run of
k seeds lands above a ratio by chance: an offline model, no trainer, no S3 (a few seconds).

    python benchmarks/model_autopilot.py [--seeds 600] [--groups 4,7,8] [--line 1.1] [--grid 8,16,32]

The model follows the benchmark's schedule (``--every-steps`` 100, gaps uniform in 0.5-1.5 of it,
``--hard`` 10 % without notice, ``--steps`` 3600) and its accounting (stalls + lost work, in
seconds). Step times are fitted to two traced ``simulate`` runs on the 2-core VM (2282 steps): a
step takes ``--step-ms`` (14.8), or with probability ``--hiccup-p`` (1.8 %) ``--hiccup-ms`` (69)
instead, and each of the ``--slow-steps`` (4) steps after a save ``--slow-after-save-ms`` (16)
more -- the save persisting and uploading in the background on two cores (those steps took 31.8
ms on average against 15.8 ms elsewhere). A save stalls ``--stall-ms`` (1.9) and is in S3
``--durable-ms`` (50) later. A noticed interruption loses nothing (its final save fits); one
without notice goes back to the newest save in S3 at that moment, and loses the time since that
step was reached.

Policies: ``every:N`` saves at multiples of N (not at the step it restored); ``auto`` is
AutoInterval on this schedule: the interval :func:`spotckpt.autopilot.plan_interval` gives from the
stall and the rate of failures without notice that ``simulate`` tells the trainer (the nominal
step time's), counted in steps of the undisturbed step time after the last save or restore, with
a wall-clock ceiling of twice the interval; beside it the same interval counted in wall seconds
(AutoInterval before it counted steps). Every policy meets the same interruptions and the same
step times (seeded).

Prints each policy's mean stalls, lost work and their sum per seed, then, for groups of k seeds
as the benchmark sums them, the distribution of each ``auto`` / the least of the fixed grid's sums
(``--grid``, the benchmark's for ``noticed`` by default) and how often it exceeds ``--line``.
``--hard 0.3 --steps 1200 --grid 5,10,20`` models ``hard30``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def interruptions(seed: int, every: int, hard: float, steps: int) -> list[tuple[int, bool | None]]:
    rng = random.Random(seed)
    out, at = [], 0
    while True:
        at += max(1, round(rng.uniform(0.5, 1.5) * every))
        if at >= steps:
            return out
        out.append((at, rng.random() < hard))


def run(policy: tuple[str, float], seed: int, a: argparse.Namespace) -> tuple[float, float]:
    """(stalls, lost work) in seconds for one seed, its run trained to the last step. ``policy``:
    ``("every", N)``; ``("steps", N)``: N steps after the last save or restore, or by the clock
    after ``--cap`` x N undisturbed steps (AutoInterval); ``("seconds", T)``: T wall seconds after the
    last save or restore (AutoInterval before it counted steps)."""
    times = random.Random(seed * 7919 + 1)  # the same step times for every policy
    stall, durable, slow = a.stall_ms / 1000, a.durable_ms / 1000, a.slow_after_save_ms / 1000
    cap = a.cap * policy[1] * undisturbed_step_s(a)
    step, t, stalls, lost, restored, last_save_t, last_save = 0, 0.0, 0.0, 0.0, 0, 0.0, 0
    reached = {0: 0.0}
    saves: list[tuple[int, float]] = []  # (step, in S3 at)
    for at, hard in [*interruptions(seed, a.every_steps, a.hard, a.steps), (a.steps, None)]:  # None: the end
        while step < at:
            step += 1
            t += (a.hiccup_ms if times.random() < a.hiccup_p else a.step_ms) / 1000
            if saves and step - saves[-1][0] <= a.slow_steps:
                t += slow  # the save persisting and uploading in the background
            reached[step] = t
            if policy[0] == "every":
                due = step % policy[1] == 0
            elif policy[0] == "steps":
                due = step - last_save >= policy[1] or t - last_save_t >= cap
            else:
                due = t - last_save_t >= policy[1]
            if due and step != restored:
                t += stall
                stalls += stall
                saves.append((step, t + durable))
                last_save_t, last_save = t, step
        if hard is None:
            break
        if hard:
            restored = max([s for s, in_s3 in saves if in_s3 <= t] + [restored])
            lost += t - reached[restored]
            step = restored
        else:
            restored = step
        saves = [(s, x) for s, x in saves if s <= restored]
        last_save_t, last_save = t, restored
    return stalls, lost


def undisturbed_step_s(a: argparse.Namespace) -> float:
    """The mean step time away from saves (what AutoInterval takes in an interval's second half)."""
    return (a.step_ms * (1 - a.hiccup_p) + a.hiccup_ms * a.hiccup_p) / 1000


def auto_interval(a: argparse.Namespace) -> tuple[float, float]:
    """(AutoInterval's interval on this schedule -- :func:`spotckpt.autopilot.plan_interval` itself,
    from the stall, the time to durable and the rates simulate tells the trainer, the final save
    fitting --, the MTBF without notice it plans from)."""
    from spotckpt.autopilot import plan_interval

    per_s = 1 / (a.every_steps * a.step_ms / 1000)
    plan = plan_interval(cost_s=a.stall_ms / 1000, to_durable_s=a.durable_ms / 1000, hard_per_s=per_s * a.hard,
                         notice_per_s=per_s * (1 - a.hard), fits=True, fits_busy=True)
    return plan.interval_s, 1 / (per_s * a.hard)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=600)
    ap.add_argument("--groups", default="4,7,8", help="seeds per benchmark run to draw the ratio for")
    ap.add_argument("--line", type=float, default=1.1)
    ap.add_argument("--grid", default="8,16,32", help="the fixed intervals the benchmark compares with (noticed's)")
    ap.add_argument("--every-steps", type=int, default=100)
    ap.add_argument("--hard", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--step-ms", type=float, default=14.8)
    ap.add_argument("--hiccup-p", type=float, default=0.018)
    ap.add_argument("--hiccup-ms", type=float, default=69.0)
    ap.add_argument("--stall-ms", type=float, default=1.9)
    ap.add_argument("--durable-ms", type=float, default=50.0)
    ap.add_argument("--slow-after-save-ms", type=float, default=16.0,
                    help="added to each of the --slow-steps steps after a save")
    ap.add_argument("--slow-steps", type=int, default=4)
    ap.add_argument("--cap", type=float, default=2.0, help="AutoInterval's wall-clock ceiling, in intervals")
    return ap


def main() -> int:
    a = parser().parse_args()
    interval, mtbf = auto_interval(a)
    grid = [int(x) for x in a.grid.split(",")]
    fixed = [("every", n) for n in grid]
    more = sorted({round(n * f) for n in grid for f in (0.75, 1.25)} - set(grid))  # how flat the optimum is
    policies = [*fixed, *[("every", n) for n in more], ("seconds", interval),
                ("steps", max(1, round(interval / undisturbed_step_s(a))))]
    sums: dict[tuple[str, float], list[float]] = {}
    names = {("seconds", interval): "auto, counting seconds (before)", policies[-1]: f"auto: every {policies[-1][1]} steps"}
    print(f"auto's interval: {interval:.3f} s (stall {a.stall_ms} ms, MTBF without notice {mtbf:.2f} s)")
    for p in policies:
        runs = [run(p, s, a) for s in range(a.seeds)]
        sums[p] = [x + y for x, y in runs]
        print(f"{names.get(p, f'every:{p[1]}'):32} stalls {statistics.fmean(r[0] for r in runs):.3f} s  "
              f"lost {statistics.fmean(r[1] for r in runs):.3f} s  sum {statistics.fmean(sums[p]):.3f} s per seed")
    for auto in policies[-2:]:
        for k in (int(x) for x in a.groups.split(",")):
            ratios = sorted(sum(sums[auto][g:g + k]) / min(sum(sums[p][g:g + k]) for p in fixed)
                            for g in range(0, a.seeds - k + 1, k))
            over = sum(r > a.line for r in ratios) / len(ratios)
            print(f"{names[auto]}, {k} seeds: / best of every:{a.grid} in hindsight: median "
                  f"{statistics.median(ratios):.3f}, 90th percentile {ratios[int(0.9 * len(ratios))]:.3f}; "
                  f"above {a.line}: {over:.0%} of {len(ratios)} groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
