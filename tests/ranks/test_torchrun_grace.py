"""`spotckpt run -- torchrun ...`: the workers get the whole grace period for their final save,
not torchrun's 30 s shutdown timeout."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spotckpt.remote.sidecar import torchrun_arg_index, with_torchrun_grace
from tests.helpers import REPO, free_port

WORKER = str(Path(__file__).with_name("slow_final_save.py"))


def test_torchrun_commands_get_the_grace_as_shutdown_timeout() -> None:
    assert torchrun_arg_index(["torchrun", "--nproc_per_node", "2", "t.py"]) == 1
    assert torchrun_arg_index([sys.executable, "-m", "torch.distributed.run", "t.py"]) == 3
    assert torchrun_arg_index(["python", "train.py", "torchrun"]) is None
    cmd = with_torchrun_grace(["torchrun", "--nproc_per_node", "2", "t.py"], 120)
    assert cmd[:2] == ["torchrun", "--shutdown-timeout=115"]  # torch 2.13's torchrun has the option
    assert with_torchrun_grace(["torchrun", "--shutdown-timeout=9", "t.py"], 120)[1] == "--shutdown-timeout=9"
    assert with_torchrun_grace(["python", "t.py"], 120) == ["python", "t.py"]


def _start(tmp_path: Path, via_shell: bool) -> subprocess.Popen[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    tr = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
          WORKER, str(tmp_path), "33"]
    # through a shell, torchrun's command line cannot be changed: its workers are signalled instead
    cmd = ["/bin/sh", "-c", " ".join(tr)] if via_shell else tr
    return subprocess.Popen([sys.executable, "-m", "spotckpt.tools.cli", "run", "--grace-seconds", "60", "--", *cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.slow
def test_final_save_longer_than_torchruns_30s_completes(tmp_path: Path) -> None:
    """Both ways torchrun can be started -- directly, and through a shell -- side by side (each
    final save takes 33 s; run together they take the time of one)."""
    dirs = {False: tmp_path / "direct", True: tmp_path / "shell"}
    procs = {}
    for via_shell, d in dirs.items():
        d.mkdir()
        procs[via_shell] = _start(d, via_shell)
    try:
        deadline = time.monotonic() + 120
        while not all((d / f"ready-{r}").exists() for d in dirs.values() for r in (0, 1)):
            for proc in procs.values():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the workers never got ready: {proc.communicate()[1][-3000:]}")
            time.sleep(0.05)
        t0 = time.monotonic()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for via_shell, proc in procs.items():
            out, err = proc.communicate(timeout=120)
            took = time.monotonic() - t0
            d = dirs[via_shell]
            assert (d / "saved-0").exists() and (d / "saved-1").exists(), (via_shell, err[-3000:])
            assert took >= 33
            if not via_shell:  # a shell dies of the SIGTERM itself; its torchrun and workers do not
                assert proc.returncode == 0, err[-3000:]
            assert "SIGKILL" not in err and "Sending process" not in err, (via_shell, err[-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
