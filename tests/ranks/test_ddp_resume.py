"""examples/train_ddp.py with two ranks on two "hosts" (separate local dirs): SIGTERM to one rank
only makes both save the same step and exit 0; the restarted job ends bit-identical to one that
was never interrupted."""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

from spotckpt.core.local import LocalStore
from tests.helpers import REPO, count_prefix, done_lines, finish_ranks, launch_ranks, read_lines_until

EXAMPLE = str(REPO / "examples" / "train_ddp.py")
ARGS = ["--steps", "60", "--every-steps", "20", "--print-every", "5"]


def _job(dirs: list[Path], *extra: str):  # type: ignore[no-untyped-def]
    return launch_ranks(lambda r: [sys.executable, EXAMPLE, *ARGS, *extra, "--local-dir", str(dirs[r])], len(dirs))


def test_sigterm_to_one_rank_stops_both_at_one_step_and_resume_is_exact(tmp_path: Path) -> None:
    want = done_lines(finish_ranks(_job([tmp_path / "ref0", tmp_path / "ref1"])))
    assert want[0].split("losses")[0] == want[1].split("losses")[0]  # same weights on both ranks

    dirs = [tmp_path / "host0", tmp_path / "host1"]
    procs = _job(dirs, "--step-sleep", "0.05")
    read_lines_until(procs[1], count_prefix("train_ddp[1]: step", 5), what="25 steps on rank 1")
    procs[1].send_signal(signal.SIGTERM)  # rank 0 never gets a signal
    results = finish_ranks(procs)
    stopped = []
    for code, out, err in results:
        assert code == 0, err[-3000:]
        m = re.search(r"preempted at step (\d+)", out)
        assert m, out[-2000:]
        stopped.append(int(m.group(1)))
    assert stopped[0] == stopped[1] and 25 <= stopped[0] < 60
    for d in dirs:
        store = LocalStore(d, create=False, cleanup=False)
        assert store.committed_steps()[-1] == stopped[0]
        assert store.read_manifest(stopped[0]).extra["world_size"] == 2

    results = finish_ranks(_job(dirs))
    for code, out, _ in results:
        assert f"starting at step {stopped[0]} of 60" in out
    assert done_lines(results) == want
