"""``benchmarks/bench_autopilot.py``'s bookkeeping on made-up runs (the runs themselves are
simulate's, tested in tests/integration/test_simulate.py): the grid option, the sums and their
standard errors, the check that every policy met the same interruptions."""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_autopilot.py"
_spec = importlib.util.spec_from_file_location("bench_autopilot", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _run(policy: str, seed: int, stalls: float, lost: list[float], at: list[list[int]]) -> dict:
    return {"schedule": "noticed", "policy": policy, "seed": seed, "stalls_s": stalls, "lost_s": sum(lost),
            "policy_wasted_s": round(stalls + sum(lost), 3), "failures_lost_s": lost, "at": at,
            "interruptions": len(at), "without_notice": sum(1 for _, k in at if not k), "restart_s": 2.0,
            "instance_s": 30.0, "lost_steps": 3, "misses_fits_busy": 0, "warned_before_first": None}


def test_grid_option_per_schedule_or_for_all() -> None:
    ns = lambda grid: argparse.Namespace(grid=grid)  # noqa: E731
    assert bench.policies_of("noticed", ns(None))[:3] == ["every:8", "every:16", "every:32"]
    assert bench.policies_of("hard30", ns("7,9"))[:-2] == ["every:7", "every:9"]
    both = ns("noticed=4,40;hard30=3")
    assert bench.policies_of("noticed", both) == ["every:4", "every:40", "auto", "young-daly"]
    assert bench.policies_of("hard30", both)[0] == "every:3"
    assert bench.policies_of("unfit", both)[:3] == ["every:12", "every:25", "every:50"]
    assert bench.policies_of("noticed", argparse.Namespace(grid=None, policies="auto")) == ["auto"]


def test_sums_standard_errors_and_the_same_interruptions_check() -> None:
    at = [[120, 1], [230, 0], [310, 1]]
    runs = [_run("every:16", 0, 0.10, [0.2, 0.1], at), _run("every:16", 1, 0.12, [0.3], at),
            _run("auto", 0, 0.08, [0.1, 0.1], [[121, 1], [233, 0], [310, 1]]), _run("auto", 1, 0.07, [0.2], at)]
    total, se = bench._sum_se([r for r in runs if r["policy"] == "every:16"])
    assert total == pytest.approx(0.82) and se == pytest.approx(math.sqrt(3) * statistics.stdev([0.2, 0.1, 0.3]))
    text = bench.table(runs, ["noticed"], {"noticed": ["every:16", "auto"]})
    assert "same interruptions for every policy: yes (steps differ by <= 3)" in text
    assert "best fixed in hindsight every:16 (0.82 s); auto 0.55 s = 0.67x" in text
    runs[2]["at"] = [[121, 1], [233, 1], [310, 1]]  # a different kind: not the same interruptions
    text = bench.table(runs, ["noticed"], {"noticed": ["every:16", "auto"]})
    assert "same interruptions for every policy: NO" in text


def test_a_changed_auto_is_merged_beside_the_earlier_one(tmp_path: Path) -> None:
    import json

    at = [[120, 1], [230, 0], [310, 1]]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"runs": [_run("every:16", 0, 0.10, [0.2, 0.1], at), _run("auto", 0, 0.2, [0.4], at)]}))
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"runs": [_run("auto", 0, 0.08, [0.1, 0.1], at)]}))
    with pytest.raises(SystemExit, match="share a seed"):
        bench.from_json(str(earlier), str(again))
    text = bench.from_json(str(earlier), str(again), renamed={str(earlier): {"auto": "auto-seconds"}})
    assert "| noticed | auto-seconds | 0.60 +- " in text and "| noticed | auto | 0.28 +- " in text
    assert "every:16 (0.40 s); auto-seconds 0.60 s = 1.50x" in text and "; auto 0.28 s = 0.70x" in text


_MODEL = Path(__file__).resolve().parents[2] / "benchmarks" / "model_autopilot.py"
_mspec = importlib.util.spec_from_file_location("model_autopilot", _MODEL)
assert _mspec is not None and _mspec.loader is not None
model = importlib.util.module_from_spec(_mspec)
_mspec.loader.exec_module(model)


def test_model_accounts_stalls_and_lost_work_like_the_benchmark() -> None:
    a = model.parser().parse_args(["--hard", "0", "--hiccup-p", "0", "--slow-after-save-ms", "0", "--steps", "1000"])
    stalls, lost = model.run(("every", 10), 0, a)
    assert lost == 0.0  # every interruption noticed: its final save fits, nothing is lost
    restarts = len(model.interruptions(0, a.every_steps, 0.0, a.steps))
    saves = round(stalls / (a.stall_ms / 1000))
    assert 1000 // 10 - restarts <= saves <= 1000 // 10  # multiples of 10, minus those a restart landed on

    a = model.parser().parse_args(["--hard", "1", "--hiccup-p", "0", "--slow-after-save-ms", "0", "--durable-ms", "0",
                                   "--steps", "1000"])
    failures = model.interruptions(0, a.every_steps, 1.0, a.steps)
    _, lost = model.run(("every", 10), 0, a)
    step_s = a.step_ms / 1000 + a.stall_ms / 1000
    assert 0 < lost <= len(failures) * 9 * step_s + 1e-9  # at most 9 steps since the last multiple of 10
    # the steps since the multiple of 10 it goes back to (and that save's stall, once per failure at most)
    since = sum(at % 10 for at, _ in failures) * a.step_ms / 1000
    assert since <= lost <= since + len(failures) * a.stall_ms / 1000 + 1e-9


def test_model_plans_auto_with_the_autopilots_own_formula() -> None:
    from spotckpt.autopilot import daly_interval

    a = model.parser().parse_args([])
    interval, mtbf = model.auto_interval(a)
    assert mtbf == pytest.approx(a.every_steps * a.step_ms / 1000 / a.hard)
    assert interval == pytest.approx(daly_interval(a.stall_ms / 1000, mtbf))
