"""`spotckpt simulate --hosts 2 -- torchrun ... examples/train_ddp.py`: two simulated hosts with
their own fresh local dirs, one of them taken away mid-training; the job resumes from S3 and ends
bit-identical to an uninterrupted run. The same for examples/hf_trainer.py and
examples/lightning_fit.py (two interruptions): tests/integrations/test_ranks_frameworks.py, which
shares its uninterrupted torchrun run with the other framework tests there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, finish_ranks, launch_ranks

ARGS = ["--steps", "60", "--every-steps", "20"]


@pytest.mark.slow
def test_two_hosts_one_interrupted_resume_exactly(tmp_path: Path) -> None:
    ref = finish_ranks(launch_ranks(lambda r: [sys.executable, str(REPO / "examples" / "train_ddp.py"), *ARGS,
                                               "--local-dir", str(tmp_path / f"ref{r}")], 2))
    want = sorted(re.search(r"done at step 60; .*", out).group(0) for _, out, _ in ref)  # type: ignore[union-attr]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    sim = subprocess.run(
        [sys.executable, "-m", "spotckpt.tools.cli", "simulate", "--hosts", "2", "--interruptions", "1",
         "--total-steps", "60", "--grace", "60", "--seed", "3", "--",
         torchrun, "--nproc_per_node", "1", "examples/train_ddp.py", *ARGS, "--step-sleep", "0.05"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:] + sim.stdout[-2000:]
    assert "spot capacity reclaimed: host" in sim.stdout and "Completed" in sim.stdout, sim.stdout
    stopped = sorted(set(re.findall(r"preempted at step (\d+)", sim.stderr)))
    assert len(stopped) == 1, sim.stderr[-3000:]  # both hosts saved the same step
    assert re.findall(r"train_ddp\[\d\]: starting at step (\d+)", sim.stderr).count(stopped[0]) == 2
    got = sorted(re.findall(r"done at step 60; .*", sim.stderr))
    assert got == want
