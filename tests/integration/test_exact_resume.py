"""Exact resume: a real training loop (dropout, shuffled DataLoader with 2 workers, AdamW, a
one-cycle LR schedule) is interrupted with SIGTERM at random steps, several times, each restart on
a fresh, empty local_dir so the state comes back from S3 -- and the final weights and the whole
loss history are bit-for-bit those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, count_prefix, read_lines_until
TOY = REPO / "examples" / "train_toy.py"
STEPS = 90


def _start(local: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(TOY), "--local-dir", str(local), "--steps", str(STEPS), "--every-steps", "10",
         "--workers", "2", "--print-every", "1", "--hidden", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )


def _digests(out: str) -> tuple[str, str]:
    m = re.search(r"train_toy: done at step \d+; .* weights (\w+); losses (\w+)", out)
    assert m, out[-1500:]
    return m.group(1), m.group(2)


def test_interrupted_run_is_bitwise_identical(tmp_path: Path, bucket: str) -> None:
    env = dict(os.environ, SPOTCKPT_METRICS="0")
    ref = _start(tmp_path / "ref", env)
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0
    want = _digests(ref_out)

    env["SPOTCKPT_S3_URI"] = f"s3://{bucket}/job"
    rng = random.Random(2026)
    expected_start = 0
    for i in range(3):
        proc = _start(tmp_path / f"instance-{i}", env)  # a new machine: empty local dir
        assert proc.stdout is not None
        stop_after = rng.randint(3, 15)  # steps of progress before the interruption
        lines = read_lines_until(proc, count_prefix("train_toy: step", stop_after), timeout=300,
                                 what=f"{stop_after} training steps")
        first = next((int(ln.split()[4]) for ln in lines if ln.startswith("train_toy: starting at step")), None)
        assert first == expected_start, (i, first, expected_start)  # resumed from S3, nothing lost
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        m = re.search(r"preempted at step (\d+)", out)
        assert m, out
        expected_start = int(m.group(1))
        assert expected_start < STEPS

    final = _start(tmp_path / "instance-final", env)
    out, _ = final.communicate(timeout=600)
    assert final.returncode == 0
    assert f"train_toy: starting at step {expected_start} of {STEPS}" in out
    assert _digests(out) == want
