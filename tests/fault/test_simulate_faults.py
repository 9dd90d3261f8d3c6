"""`spotckpt simulate` when things go wrong: a trainer ignoring SIGTERM, a wait budget too small.

Timings here are jittered (seeded delays measured on a loaded machine), so the assertions are the
invariants the simulator guarantees, not exact figures: every interruption during training, lost
work bounded by what the instance did, the real final step, statuses in lifecycle order."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import psutil
import pytest

from spotckpt.tools.simulate import EXIT_MAX_WAIT, simulate
from spotckpt.tools.simulate.schedule import NO_PROGRESS_RESTARTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_simulate import FAKE_TRAINER, assert_interruptions_during_training  # noqa: E402

ONE = ["Starting", "Downloading", "Training"]


@pytest.fixture
def trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    p = tmp_path / "fake_trainer.py"
    p.write_text(FAKE_TRAINER)
    return p


def _children_gone(before: set[int]) -> bool:
    now = {p.pid for p in psutil.Process().children(recursive=True)}
    return not (now - before)


def _assert_lost_work_bounded(it: dict) -> None:
    """What an interruption lost is at most what that instance trained: the steps past the one
    the next instance restored, and no more seconds than it ran for."""
    assert it["lost_steps"] == it["last_step_reached"] - it["restored_step"] >= 0, it
    assert 0 <= it["lost_seconds"] <= it["ran_seconds"], it


def test_trainer_ignoring_sigterm_is_killed_and_lost_work_reported(trainer: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()
    # Saves only at the end: whatever it did before the kill is lost.
    rc = simulate([sys.executable, str(trainer), "150", "0.02", "100000", "ignore"], interruptions=1,
                  seed=0, grace_seconds=1.0, restart_delay_seconds=0.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed"
    assert [e["status"] for e in doc["events"]] == ONE + ["Interrupted"] + ONE + ["Uploading", "Completed"]
    assert_interruptions_during_training(doc, 150)
    (it,) = doc["interruptions"]
    assert it["killed_after_grace"] is True
    assert it["exit_code"] == -9
    assert it["restored_step"] == 0  # nothing was saved: the next instance starts over
    assert it["lost_steps"] == it["last_step_reached"] >= it["step_at_interruption"] >= 1
    assert it["lost_seconds"] > 0
    _assert_lost_work_bounded(it)
    assert doc["lost_steps_total"] == it["lost_steps"]
    assert _children_gone(before)


def test_trainer_ignoring_sigterm_human_summary(trainer: Path) -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "200", "0.02", "100000", "ignore"], interruptions=1,
                  grace_seconds=0.5, restart_delay_seconds=0.0, stream=out)
    text = out.getvalue()
    assert rc == 0
    assert "killed with SIGKILL after 0.5 s" in text
    assert "[ignored SIGTERM: SIGKILLed]" in text
    assert "restored step 0 -> lost " in text and "-> lost 0 step" not in text
    assert "final step 200," in text and "[after the final step]" not in text


def test_max_wait_exceeded(trainer: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()
    # 10 000 steps of 20 ms cannot finish in a 2 s budget.
    rc = simulate([sys.executable, str(trainer), "10000", "0.02", "50", "honour"], interruptions=0,
                  grace_seconds=30, max_wait_seconds=2.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == EXIT_MAX_WAIT
    statuses = [e["status"] for e in doc["events"]]
    assert statuses == ONE + ["Stopping", "MaxWaitTimeExceeded"]
    assert doc["interruptions"] == [] and doc["final_step"] >= 1
    assert "Completed" not in statuses
    assert doc["outcome"] == "MaxWaitTimeExceeded"
    assert _children_gone(before)


def test_simulator_terminated_takes_the_trainer_with_it(trainer: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import time

    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo))
    sim = subprocess.Popen([sys.executable, "-m", "spotckpt.tools.simulate", "--interruptions", "0", "--",
                            sys.executable, str(trainer), "100000", "0.02", "1000", "honour"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        trainers: list[psutil.Process] = []
        while not trainers and time.monotonic() < deadline:
            trainers = [p for p in psutil.Process(sim.pid).children(recursive=True)
                        if str(trainer) in " ".join(p.cmdline())]
            time.sleep(0.1)
        assert trainers, "the trainer never started"
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(timeout=120) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(trainers, timeout=30)
        assert not alive
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()


def test_interrupt_every_gives_up_on_a_trainer_that_never_saves(trainer: Path) -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "100", "0.02", "100000", "ignore"], interrupt_every_seconds=0.4,
                  seed=2, grace_seconds=0.3, restart_delay_seconds=0.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed"
    assert_interruptions_during_training(doc, 100)
    its = doc["interruptions"]
    # Every instance but the last was interrupted, in lifecycle order.
    assert [e["status"] for e in doc["events"]] == (ONE + ["Interrupted"]) * len(its) + ONE + ["Uploading", "Completed"]
    # Nothing is ever saved, so every restart resumes from 0 and loses all that instance trained.
    assert all(i["restored_step"] == 0 and i["killed_after_grace"] for i in its)
    for i in its:
        _assert_lost_work_bounded(i)
    assert doc["lost_steps_total"] == sum(i["last_step_reached"] for i in its) > 0
    # It gives up after NO_PROGRESS_RESTARTS restarts in a row from no newer step -- the rule, not
    # the timing, fixes the count: instance 1, then 3 stalled restarts, then one runs through.
    assert any("no newer step" in n for n in doc["notes"])
    assert len(its) == NO_PROGRESS_RESTARTS + 1
