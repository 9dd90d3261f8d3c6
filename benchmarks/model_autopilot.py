"""What bench_autopilot's ``noticed`` comparison looks like in expectation, and how often a run of
k seeds lands above a ratio by chance: an offline model, no trainer, no S3 (a few seconds).

    python benchmarks/model_autopilot.py [--seeds 600] [--groups 4,7,8] [--line 1.1]

The model follows the benchmark's schedule (``--every-steps`` 100, gaps uniform in 0.5-1.5 of it,
``--hard`` 10 % without notice, ``--steps`` 3600) and its accounting (stalls + lost work, in
seconds). A step takes ``--step-ms`` (14.3 ms, the quiet VM's median), and with probability
``--hiccup-p`` (4.3 %) ``--hiccup-ms`` (75 ms) instead -- fitted to the step times of two traced
``simulate`` runs on the 2-core VM (2121 steps: 95.7 % under 40 ms with a median of 14.3 ms, the
rest averaging 75 ms). A save stalls ``--stall-ms`` (1.9) and is in S3 ``--durable-ms`` (50) later.
A noticed interruption loses nothing (its final save fits); one without notice goes back to the
newest save in S3 at that moment, and loses the time since that step was reached.

Policies: ``every:N`` saves at multiples of N (not at the step it restored); ``auto`` saves when
its interval in seconds has passed since the last save or restore -- the interval Young/Daly gives
from the stall and the rate of failures without notice that ``simulate`` tells the trainer (the
nominal step time's), as AutoInterval plans it on this schedule. Every policy meets the same
interruptions and the same step times (seeded).

Prints each policy's mean stalls, lost work and their sum per seed, then, for groups of k seeds
as the benchmark sums them, the distribution of ``auto`` / the least of the fixed grid's sums
(8, 16, 32 as in the benchmark) and how often it exceeds ``--line``.
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
    """(stalls, lost work) in seconds for one seed, its run trained to the last step."""
    times = random.Random(seed * 7919 + 1)  # the same step times for every policy
    stall, durable = a.stall_ms / 1000, a.durable_ms / 1000
    step, t, stalls, lost, restored, last_save_t = 0, 0.0, 0.0, 0.0, 0, 0.0
    reached = {0: 0.0}
    saves: list[tuple[int, float]] = []  # (step, in S3 at)
    for at, hard in [*interruptions(seed, a.every_steps, a.hard, a.steps), (a.steps, None)]:  # None: the end
        while step < at:
            step += 1
            t += (a.hiccup_ms if times.random() < a.hiccup_p else a.step_ms) / 1000
            reached[step] = t
            due = step % policy[1] == 0 if policy[0] == "every" else t - last_save_t >= policy[1]
            if due and step != restored:
                t += stall
                stalls += stall
                saves.append((step, t + durable))
                last_save_t = t
        if hard is None:
            break
        if hard:
            restored = max([s for s, in_s3 in saves if in_s3 <= t] + [restored])
            lost += t - reached[restored]
            step = restored
        else:
            restored = step
        saves = [(s, x) for s, x in saves if s <= restored]
        last_save_t = t
    return stalls, lost


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
    ap.add_argument("--every-steps", type=int, default=100)
    ap.add_argument("--hard", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--step-ms", type=float, default=14.3)
    ap.add_argument("--hiccup-p", type=float, default=0.043)
    ap.add_argument("--hiccup-ms", type=float, default=75.0)
    ap.add_argument("--stall-ms", type=float, default=1.9)
    ap.add_argument("--durable-ms", type=float, default=50.0)
    return ap


def main() -> int:
    a = parser().parse_args()
    interval, mtbf = auto_interval(a)
    fixed = [("every", 8), ("every", 16), ("every", 32)]
    policies = [*fixed, ("every", 12), ("every", 20), ("auto", interval)]
    sums: dict[tuple[str, float], list[float]] = {}
    print(f"auto's interval: {interval:.3f} s (stall {a.stall_ms} ms, MTBF without notice {mtbf:.2f} s)")
    for p in policies:
        runs = [run(p, s, a) for s in range(a.seeds)]
        sums[p] = [x + y for x, y in runs]
        name = f"every:{p[1]}" if p[0] == "every" else "auto"
        print(f"{name:9} stalls {statistics.fmean(r[0] for r in runs):.3f} s  lost {statistics.fmean(r[1] for r in runs):.3f} s"
              f"  sum {statistics.fmean(sums[p]):.3f} s per seed")
    auto = policies[-1]
    for k in (int(x) for x in a.groups.split(",")):
        ratios = sorted(sum(sums[auto][g:g + k]) / min(sum(sums[p][g:g + k]) for p in fixed)
                        for g in range(0, a.seeds - k + 1, k))
        over = sum(r > a.line for r in ratios) / len(ratios)
        print(f"{k} seeds: auto / best of every:8,16,32 in hindsight: median {statistics.median(ratios):.3f}, "
              f"90th percentile {ratios[int(0.9 * len(ratios))]:.3f}; above {a.line}: {over:.0%} of {len(ratios)} groups")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
