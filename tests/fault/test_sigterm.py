"""SIGTERM: the trainer saves the current step synchronously, exits 0, and resumes from it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from spotckpt import CheckpointManager
from tests.helpers import REPO, assert_all_steps_verify, assert_state_is_step, count_prefix, empty_state, read_lines_until

CHILD = Path(__file__).with_name("saver_child.py")


def _wait_for_line(proc: subprocess.Popen[str], prefix: str, count: int = 1) -> list[str]:
    return read_lines_until(proc, count_prefix(prefix, count), what=f"{count}x {prefix!r}")


def test_sigterm_saves_current_step_and_exits_zero(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path), "async", "--policy", "--numel", "4096",
                             "--step-sleep", "0.01"], stdout=subprocess.PIPE, text=True)
    try:
        _wait_for_line(proc, "at ", count=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    preempted = [ln for ln in out.splitlines() if ln.startswith("preempted ")]
    assert len(preempted) == 1, out
    step = int(preempted[0].split()[1])
    assert step >= 20
    assert assert_all_steps_verify(tmp_path) == [step]  # the policy never saved: only the final save
    target = empty_state(numel=4096)
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(target) == step
    assert_state_is_step(target, step, numel=4096)


def _toy(local: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(REPO / "examples" / "train_toy.py"), "--local-dir", str(local),
                             "--steps", "80", "--hidden", "64", "--print-every", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)


def _final_digest(out: str) -> str:
    done = [ln for ln in out.splitlines() if ln.startswith("train_toy: done")]
    assert done, out[-2000:]
    return done[-1].rsplit("weights ", 1)[1]


def test_train_toy_stopped_with_sigterm_continues_from_saved_step(tmp_path: Path) -> None:
    ref = _toy(tmp_path / "ref")
    ref_out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0

    proc = _toy(tmp_path / "run", "--step-sleep", "0.02", "--workers", "2")
    try:
        lines = _wait_for_line(proc, "train_toy: step", count=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    pre = [ln for ln in (lines + out.splitlines()) if "preempted at step" in ln]
    assert pre, out
    stopped = int(pre[0].split("preempted at step ")[1].split(";")[0])
    assert 30 <= stopped < 80

    again = _toy(tmp_path / "run", "--workers", "2")
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0
    assert f"train_toy: starting at step {stopped} of 80" in out2
    assert _final_digest(out2) == _final_digest(ref_out)  # the same run, bit for bit
