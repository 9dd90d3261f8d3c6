"""`spotckpt simulate` when things go wrong: a trainer ignoring SIGTERM, a wait budget too small."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import psutil
import pytest

from spotckpt.simulate import EXIT_MAX_WAIT, simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_simulate import FAKE_TRAINER  # noqa: E402


@pytest.fixture
def trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    p = tmp_path / "fake_trainer.py"
    p.write_text(FAKE_TRAINER)
    return p


def _children_gone(before: set[int]) -> bool:
    now = {p.pid for p in psutil.Process().children(recursive=True)}
    return not (now - before)


def test_trainer_ignoring_sigterm_is_killed_and_lost_work_reported(trainer: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()
    # Saves only at the end: whatever it did before the kill is lost.
    rc = simulate([sys.executable, str(trainer), "150", "0.02", "100000", "ignore"], interruptions=1,
                  seed=0, grace_seconds=1.0, restart_delay_seconds=0.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed"
    (it,) = doc["interruptions"]
    assert it["killed_after_grace"] is True
    assert it["exit_code"] == -9
    assert it["restored_step"] == 0
    assert it["lost_steps"] == it["last_step_reached"] >= 1
    assert it["lost_seconds"] > 0
    assert doc["lost_steps_total"] == it["lost_steps"]
    assert doc["final_step"] == 150
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


def test_max_wait_exceeded(trainer: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = io.StringIO()
    # 10 000 steps of 20 ms cannot finish in a 2 s budget.
    rc = simulate([sys.executable, str(trainer), "10000", "0.02", "50", "honour"], interruptions=0,
                  grace_seconds=30, max_wait_seconds=2.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == EXIT_MAX_WAIT
    statuses = [e["status"] for e in doc["events"]]
    assert statuses[-2:] == ["Stopping", "MaxWaitTimeExceeded"]
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
    sim = subprocess.Popen([sys.executable, "-m", "spotckpt.simulate", "--interruptions", "0", "--",
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
    assert rc == 0 and doc["outcome"] == "Completed" and doc["final_step"] == 100
    # Instance 1 starts at 0; instances 2, 3, 4 resume from 0 again (3 stalls): the 5th runs through.
    assert doc["instances"] == 5
    assert [i["restored_step"] for i in doc["interruptions"]] == [0, 0, 0, 0]
    assert all(i["killed_after_grace"] for i in doc["interruptions"])
    assert doc["lost_steps_total"] == sum(i["last_step_reached"] for i in doc["interruptions"]) > 0
    assert any("no newer step" in n for n in doc["notes"])
