"""spotckpt sync / run process logic: real processes, real signals, real S3 endpoint (moto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from spotckpt.errors import ConfigError
from spotckpt.remote.s3 import S3Store
from spotckpt.remote.sidecar import run_command

# Every S3 test here runs against moto and a real server (SeaweedFS); see tests/conftest.py.
S3_SERVERS = ("moto", "seaweedfs")

REPO = Path(__file__).resolve().parents[2]

# A trainer that traps SIGTERM, then writes a committed step in the format (staging dir, fsync,
# rename) and exits 0 -- what a spotckpt-managed training loop does on preemption.
TRAINER = textwrap.dedent(
    """
    import os, signal, sys, tempfile, time
    from pathlib import Path
    import torch
    from spotckpt.format import MANIFEST_NAME, FileEntry, Manifest, crc32c_b64, file_crc32c, step_dirname, write_safetensors
    local = Path(sys.argv[1]); ready = Path(sys.argv[2]); step = int(sys.argv[3])
    stop = []
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(s))
    local.mkdir(parents=True, exist_ok=True)
    ready.write_text(str(os.getpid()))
    while not stop:
        time.sleep(0.05)
    stage = Path(tempfile.mkdtemp(dir=local.parent, prefix=".stage-"))
    e = write_safetensors(stage / "rank-00000.safetensors", {"w": torch.arange(300000, dtype=torch.float32)})
    man = Manifest(step=step, files={"rank-00000.safetensors": e}, extra={"reason": "sigterm"})
    with open(stage / MANIFEST_NAME, "wb") as f:
        f.write(man.to_bytes()); os.fsync(f.fileno())
    os.rename(stage, local / step_dirname(step))
    sys.exit(0)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_run_forwards_sigterm_through_sh_and_uploads_final_step(bucket: str, tmp_path: Path) -> None:
    local, ready = tmp_path / "ckpt", tmp_path / "ready"
    (tmp_path / "trainer.py").write_text(TRAINER)
    inner = f"{sys.executable} {tmp_path / 'trainer.py'} {local} {ready} 42; echo trainer-done"
    launcher = (
        "import logging, sys; logging.basicConfig(level=logging.INFO)\n"
        "from spotckpt.remote.sidecar import run_command\n"
        f"sys.exit(run_command(['/bin/sh', '-c', {inner!r}], s3_uri='s3://{bucket}/job', local_dir={str(local)!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_file(ready, proc)
        trainer_pid = int(ready.read_text())
        assert os.getpgid(trainer_pid) != os.getpgid(proc.pid)  # CMD runs in its own group
        proc.send_signal(signal.SIGTERM)  # only the launcher gets it, as on SageMaker
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The shell (CMD) died of the forwarded SIGTERM and that is the code reported; the trainer
    # in its group trapped it, wrote its final step, and the launcher waited for it and for the
    # upload before exiting.
    assert proc.returncode == 128 + signal.SIGTERM, out.decode()
    assert b"trainer-done" not in out
    with pytest.raises(ProcessLookupError):
        os.kill(trainer_pid, 0)
    store = S3Store(f"s3://{bucket}/job")
    assert store.list_steps() == [42]
    assert store.download_step(42, tmp_path / "verify").extra == {"reason": "sigterm"}


def test_sync_flushes_on_sigterm_and_exits_0(bucket: str, tmp_path: Path) -> None:
    local, ready = tmp_path / "ckpt", tmp_path / "ready"
    (tmp_path / "trainer.py").write_text(TRAINER)
    sync = (
        "import logging, sys\nlogging.basicConfig(level=logging.INFO)\nfrom spotckpt.remote.sidecar import run_sync\n"
        f"sys.exit(run_sync({str(local)!r}, 's3://{bucket}/sync', keep_last=1))\n"
    )
    trainer = subprocess.Popen([sys.executable, str(tmp_path / "trainer.py"), str(local), str(ready), "7"], env=_env())
    sidecar = subprocess.Popen([sys.executable, "-c", sync], env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert sidecar.stderr is not None
        for line in sidecar.stderr:  # its signal handlers are installed once it says so
            if "spotckpt sync: watching" in line:
                break
        _wait_file(ready, trainer)
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=120) == 0
        sidecar.send_signal(signal.SIGTERM)  # right after the commit: the flush must pick it up
        _, err = sidecar.communicate(timeout=180)
        assert sidecar.returncode == 0, err
    finally:
        for p in (trainer, sidecar):
            if p.poll() is None:
                p.kill()
    assert S3Store(f"s3://{bucket}/sync").list_steps() == [7]


def test_run_exit_codes_and_missing_command(tmp_path: Path) -> None:
    assert run_command(["/bin/sh", "-c", "exit 3"]) == 3
    assert run_command(["/bin/sh", "-c", "kill -KILL $$"]) == 128 + signal.SIGKILL
    with pytest.raises(ConfigError, match="cannot start"):
        run_command([str(tmp_path / "no-such-program")])
    with pytest.raises(ConfigError):
        run_command([])


def test_cli_sync_once_and_run(bucket: str, tmp_path: Path) -> None:
    from spotckpt.format import step_dirname

    local, ready = tmp_path / "ckpt", tmp_path / "ready"
    (tmp_path / "trainer.py").write_text(TRAINER)
    trainer = subprocess.Popen([sys.executable, str(tmp_path / "trainer.py"), str(local), str(ready), "5"], env=_env())
    _wait_file(ready, trainer)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=120) == 0
    assert (local / step_dirname(5)).is_dir()
    cli = [sys.executable, "-m", "spotckpt.tools.cli"]
    res = subprocess.run([*cli, "sync", "--once", "--local", str(local), "--s3", f"s3://{bucket}/cli"], env=_env(), timeout=180)
    assert res.returncode == 0
    assert S3Store(f"s3://{bucket}/cli").list_steps() == [5]
    res = subprocess.run([*cli, "run", "--", "/bin/sh", "-c", "exit 4"], env=_env(), timeout=180)
    assert res.returncode == 4
    res = subprocess.run([*cli, "sync", "--once", "--local", str(local), "--s3", "s3:/broken"], env=_env(), timeout=180,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "s3://bucket/prefix" in res.stderr
