"""`spotckpt run` passes SIGTERM to the trainer without killing its DataLoader workers (a
SIGTERM from anyone but their parent kills PyTorch's workers, which would crash the trainer in
the middle of its final save); through `/bin/sh -c` too."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_all_steps_verify, count_prefix, read_lines_until

CHILD = Path(__file__).with_name("loader_child.py")


@pytest.mark.parametrize("via_shell", [False, True])
def test_run_forwards_sigterm_to_trainer_not_to_loader_workers(tmp_path: Path, via_shell: bool) -> None:
    trainer = [sys.executable, str(CHILD), str(tmp_path / "ckpt")]
    cmd = ["/bin/sh", "-c", shlex.join(trainer) + "; echo shell-after"] if via_shell else trainer
    proc = subprocess.Popen([sys.executable, "-m", "spotckpt.tools.cli", "run", "--", *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    read_lines_until(proc, count_prefix("at ", 20), what="20 training steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "preempted" in out, err[-3000:]
    assert "killed by signal" not in err
    if not via_shell:
        assert proc.returncode == 0, err[-3000:]
    steps = assert_all_steps_verify(tmp_path / "ckpt")
    assert len(steps) == 1 and steps[0] >= 20
