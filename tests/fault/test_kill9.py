"""kill -9 torture: a real child process saving in a loop is SIGKILLed at random moments.

After every kill, every committed step must verify, and a fresh manager must restore a complete
step whose content equals what was saved at that step (never older than the last step a
synchronous save reported committed). The next child restarts in the same directory, so stale
staging cleanup and retention deletions interrupted by the kill are exercised too.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotckpt import CheckpointManager
from tests.helpers import assert_all_steps_verify, assert_state_is_step, count_prefix, empty_state, read_lines_until

CHILD = Path(__file__).with_name("saver_child.py")
NUMEL = 1 << 18  # 4 tensors x 1 MiB: big enough that a kill lands mid-write


def _run_and_kill(d: Path, mode: str, rng: random.Random) -> int:
    """Start the child, let it save a random number of steps, SIGKILL it at a random moment.
    Returns the last step the child reported as saved."""
    proc = subprocess.Popen([sys.executable, str(CHILD), str(d), mode, "--numel", str(NUMEL)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    want = rng.randint(1, 4)
    try:
        saved = [ln for ln in read_lines_until(proc, count_prefix("saved ", want), what=f"{want} saves")
                 if ln.startswith("saved ")]
        last = int(saved[-1].split()[1])
        time.sleep(rng.uniform(0.0, 0.03))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return last


@pytest.mark.parametrize("mode,trials", [("sync", 12), ("async", 12)])
def test_kill9_never_leaves_a_broken_step(tmp_path: Path, mode: str, trials: int) -> None:
    rng = random.Random(f"kill9-{mode}")
    d = tmp_path / "ckpt"
    last_committed = 0
    for trial in range(trials):
        reported = _run_and_kill(d, mode, rng)
        steps = assert_all_steps_verify(d)
        assert not [n for n in os.listdir(d) if n.startswith("step-") and not n[5:].isdigit()]
        target = empty_state(numel=NUMEL)
        with CheckpointManager(d, metrics=False, install_signal_handlers=False) as mgr:
            got = mgr.restore(target)
        if not steps:  # killed before the first (async) save was committed: nothing to restore
            assert got is None and last_committed == 0 and (mode == "async" or reported <= 0), (trial, reported)
            continue
        assert got is not None and got == steps[-1], (trial, got, steps)
        assert_state_is_step(target, got, numel=NUMEL)
        if mode == "sync" and reported > 0:
            assert got >= reported, (trial, got, reported)  # a returned sync save is durable
        assert got >= last_committed  # never goes backwards
        last_committed = got
