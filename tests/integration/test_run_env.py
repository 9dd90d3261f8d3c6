"""`spotckpt run` hands its settings to the trainer (SPOTCKPT_LOCAL_DIR / _S3_URI /
_GRACE_SECONDS), exactly one process uploads each step, a fresh machine resumes from S3, and a
SIGTERM while the launcher starts is handled. Real CLI, real processes and signals, moto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from spotckpt import CheckpointManager
from spotckpt.remote.s3 import S3Store
from tests.helpers import REPO

# The README's loop, with no directory and no S3 URI of its own. Its output goes to a file, so
# the launcher's own output can be told apart.
TRAINER = textwrap.dedent(
    """
    import os, sys, time
    import torch, spotckpt
    total, log = int(sys.argv[1]), sys.argv[2]
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1); os.dup2(fd, 2)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    state = {"model": model, "runs": []}
    with spotckpt.CheckpointManager(local_dir=None, s3_uri=None, every_steps=5, keep_last=None,
                                    async_save=False) as mgr:
        start = mgr.restore(state) or 0
        state["runs"] = list(state["runs"]) + [start]
        print(f"START {start} GRACE {os.environ.get('SPOTCKPT_GRACE_SECONDS')} "
              f"LOCAL {mgr.local.root}", flush=True)
        for step in range(start, total):
            with torch.no_grad():
                model.weight.add_(1.0)
            time.sleep(0.05)
            mgr.maybe_save(step + 1, state)
            print(f"STEP {step + 1}", flush=True)
            if mgr.preempted:
                print(f"PREEMPTED {step + 1}", flush=True)
                break
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("SPOTCKPT_LOCAL_DIR", "SPOTCKPT_S3_URI", "SPOTCKPT_GRACE_SECONDS"):
        env.pop(k, None)
    return env


def _lines(log: Path, prefix: str) -> list[str]:
    if not log.exists():
        return []
    return [ln for ln in log.read_text().splitlines() if ln.startswith(prefix)]


def test_run_passes_its_settings_and_a_fresh_machine_resumes_from_s3(bucket: str, tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(TRAINER)
    uri = f"s3://{bucket}/job"
    cli = [sys.executable, "-m", "spotckpt.tools.cli", "run", "--s3", uri, "--grace-seconds", "45"]

    # Instance 1: a fresh empty local dir, SIGTERM to the launcher (as SageMaker sends it).
    log1 = tmp_path / "trainer1.log"
    first = subprocess.Popen([*cli, "--local", str(tmp_path / "local1"), "--",
                              sys.executable, str(tmp_path / "train.py"), "1000", str(log1)],
                             env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        while len(_lines(log1, "STEP ")) < 12:
            assert first.poll() is None, (first.stderr.read() if first.stderr else "", log1.read_text())
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        _, launcher_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    text1 = log1.read_text()
    assert first.returncode == 0, (launcher_err, text1)
    assert _lines(log1, "START ") == [f"START 0 GRACE 45 LOCAL {tmp_path / 'local1'}"], text1
    preempted = int(_lines(log1, "PREEMPTED ")[0].split()[1])
    steps1 = S3Store(uri).list_steps()
    assert steps1 and steps1[-1] == preempted, (steps1, text1)
    # Exactly one process uploaded: the trainer's manager; the launcher uploaded nothing.
    assert "event=durable_s3 step=%d" % preempted in text1
    assert "committed to s3://" not in launcher_err, launcher_err

    # Instance 2: a NEW empty local dir resumes from the step in S3, not from 0.
    log2 = tmp_path / "trainer2.log"
    res = subprocess.run([*cli, "--local", str(tmp_path / "local2"), "--",
                          sys.executable, str(tmp_path / "train.py"), "30", str(log2)],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stderr, log2.read_text())
    assert _lines(log2, "START ")[0].startswith(f"START {preempted} "), log2.read_text()
    # The prefix holds one run's steps: every 5th step and the preemption step, the newest
    # of which records both starts (0, then the resume).
    assert S3Store(uri).list_steps() == sorted(set(range(5, 31, 5)) | {preempted})
    state = {"model": torch.nn.Linear(4, 4), "runs": None}
    with CheckpointManager(tmp_path / "check", s3_uri=uri, metrics=False) as mgr:
        assert mgr.restore(state) == 30
    assert state["runs"] == [0, preempted]


# Sends this process SIGTERM the first time torch or boto3 is about to be imported: a signal
# that lands while the launcher is still loading.
SIGTERM_ON_HEAVY_IMPORT = textwrap.dedent(
    """
    import os, signal, sys
    class _Trip:
        fired = False
        def find_spec(self, name, path=None, target=None):
            if not _Trip.fired and name in ("torch", "boto3"):
                _Trip.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
            return None
    sys.meta_path.insert(0, _Trip())
    """
)


def test_sigterm_while_the_launcher_starts_is_not_a_silent_143(bucket: str, tmp_path: Path) -> None:
    (tmp_path / "shim").mkdir()
    (tmp_path / "shim" / "sitecustomize.py").write_text(SIGTERM_ON_HEAVY_IMPORT)
    env = _env()
    env["PYTHONPATH"] = str(tmp_path / "shim") + os.pathsep + env["PYTHONPATH"]
    started = tmp_path / "started"
    res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "run", "--s3", f"s3://{bucket}/early",
                          "--local", str(tmp_path / "local"), "--", sys.executable, "-c",
                          f"open({str(started)!r}, 'w')"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 128 + signal.SIGTERM, (res.returncode, res.stderr)
    assert "SIGTERM arrived before" in res.stderr and "not starting it" in res.stderr, res.stderr
    assert not started.exists()


def test_settings_already_in_the_environment_stay_and_local_must_be_local(tmp_path: Path) -> None:
    show = "import os; print(*(os.environ.get(k) for k in ('SPOTCKPT_LOCAL_DIR', 'SPOTCKPT_GRACE_SECONDS')))"
    env = _env()
    env["SPOTCKPT_LOCAL_DIR"], env["SPOTCKPT_GRACE_SECONDS"] = str(tmp_path / "preset"), "33"
    res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "run", "--", sys.executable, "-c", show],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == [str(tmp_path / "preset"), "33"], res.stderr
    res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "run", "--local", "S3://b/p", "--", "true"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "malformed S3 URI" in res.stderr, res.stderr
