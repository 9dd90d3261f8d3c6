"""examples/train_fsdp.py (FSDP2, gloo, CPU) with two ranks: SIGTERM to one rank makes both save
the same step of their shards and exit 0; the restarted job ends bit-identical (weights and loss
history) to one that was never interrupted; a restart with one process reshards the step."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spotckpt.core.local import LocalStore
from tests.helpers import REPO, count_prefix, done_lines, finish_ranks, launch_ranks, read_lines_until

pytestmark = pytest.mark.ranks

EXAMPLE = str(REPO / "examples" / "train_fsdp.py")
ARGS = ["--steps", "40", "--every-steps", "15", "--print-every", "5", "--hidden", "48"]


def _job(local_dir: Path, *extra: str, world: int = 2):  # type: ignore[no-untyped-def]
    return launch_ranks(lambda r: [sys.executable, EXAMPLE, *ARGS, *extra, "--local-dir", str(local_dir)], world)


def test_fsdp_sigterm_to_one_rank_then_exact_resume_and_resharded_resume(tmp_path: Path) -> None:
    want = done_lines(finish_ranks(_job(tmp_path / "ref")))
    assert want[0].split("losses")[0] == want[1].split("losses")[0]  # full weights agree across ranks

    ck = tmp_path / "ck"
    procs = _job(ck, "--step-sleep", "0.05")
    read_lines_until(procs[1], count_prefix("train_fsdp[1]: step", 4), what="20 steps on rank 1")
    procs[1].send_signal(signal.SIGTERM)  # rank 0 never gets a signal
    stopped = []
    for code, out, err in finish_ranks(procs):
        assert code == 0, err[-3000:]
        m = re.search(r"preempted at step (\d+)", out)
        assert m, out[-2000:]
        stopped.append(int(m.group(1)))
    assert stopped[0] == stopped[1] and 20 <= stopped[0] < 40
    store = LocalStore(ck, create=False, cleanup=False)
    manifest = store.read_manifest(stopped[0])
    assert manifest.extra["world_size"] == 2 and manifest.extra["sharded"] == ["model", "optim"]

    # one process (world size 1) picks up the 2-rank step, resharded, and trains on
    shutil.copytree(ck, tmp_path / "one")
    env = {**os.environ, "SPOTCKPT_METRICS": "0"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    one = subprocess.run([sys.executable, EXAMPLE, *ARGS, "--local-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=REPO, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"starting at step {stopped[0]} of 40 with 1 rank(s)" in one.stdout
    assert "done at step 40" in one.stdout

    results = finish_ranks(_job(ck))
    for code, out, _ in results:
        assert f"starting at step {stopped[0]} of 40 with 2 rank(s)" in out
    assert done_lines(results) == want


def test_fsdp_sigterm_right_after_the_last_step_still_exits_0(tmp_path: Path) -> None:
    """The instance goes away right after the last step: rank 1 gets SIGTERM once it printed
    "done" (manager closed, every step durable) while rank 0 is held back, so rank 1 is in the
    final barrier. It must finish there with rank 0, not die and fail the finished run."""
    procs = _job(tmp_path / "ck", "--steps", "10", "--every-steps", "10")
    read_lines_until(procs[1], count_prefix("train_fsdp[1]: done at step 10"), what="rank 1 done")
    procs[0].send_signal(signal.SIGSTOP)
    try:
        procs[1].send_signal(signal.SIGTERM)
        procs[0].send_signal(signal.SIGTERM)  # delivered once it runs again
    finally:
        procs[0].send_signal(signal.SIGCONT)
    for code, out, err in finish_ranks(procs):
        assert code == 0, err[-3000:]
    assert LocalStore(tmp_path / "ck", create=False, cleanup=False).committed_steps() == [10]
