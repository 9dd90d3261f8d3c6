"""The inspection commands against a real S3 endpoint (moto): a mistyped prefix, the result of
a restore printed once, and `sync` starting without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spotckpt import CheckpointManager
from tests.helpers import REPO, step_state


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_s3_inspection_restore_once_and_sync_without_torch(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/job"
    with CheckpointManager(tmp_path / "ckpt", s3_uri=uri, metrics=False) as mgr:
        mgr.save(4, step_state(4, numel=256), blocking=True)
    res = _cli("verify", uri)
    assert res.returncode == 0 and " valid" in res.stdout, res.stderr
    res = _cli("verify", f"s3://{bucket}/jbo")  # a typo in the prefix
    assert res.returncode == 1 and "no committed step" in res.stderr, (res.stdout, res.stderr)
    res = _cli("restore", uri, "--to", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    said = [ln for ln in (res.stdout + res.stderr).splitlines() if "step 4" in ln]
    assert len(said) == 1 and said[0].startswith("restored step 4 from"), res.stdout + res.stderr
    code = (f"import sys\nfrom spotckpt.tools.cli import main\n"
            f"rc = main(['sync', '--once', '--local', {str(tmp_path / 'ckpt')!r}, '--s3', '{uri}2'])\n"
            "print('TORCH', 'torch' in sys.modules, 'RC', rc)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "TORCH False RC 0" in res.stdout, (res.stdout, res.stderr)


def test_sync_prints_each_metric_line_once(bucket: str, tmp_path: Path) -> None:
    # the CLI logs at INFO; the metric line goes to stderr itself and must not come again as a log record
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        mgr.save(7, step_state(7, numel=64), blocking=True)
    res = _cli("sync", "--once", "--local", str(tmp_path / "ckpt"), "--s3", f"s3://{bucket}/job")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "event=durable_s3" in ln]
    assert len(lines) == 1 and lines[0].startswith("spotckpt event=durable_s3 step=7 "), res.stderr


def test_sync_and_run_refuse_a_local_dir_that_is_missing_or_a_file(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/job"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    res = _cli("sync", "--once", "--local", str(tmp_path / "typo"), "--s3", uri)
    assert res.returncode == 2 and "does not exist: nothing to upload" in res.stderr, res.stderr
    for args in (["sync", "--once", "--local", str(a_file), "--s3", uri],
                 ["sync", "--local", str(a_file), "--s3", uri],
                 ["run", "--local", str(a_file), "--s3", uri, "--", sys.executable, "-c", "print('TRAINER RAN')"]):
        res = _cli(*args)
        assert res.returncode == 2 and "is a file, not a directory" in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and "TRAINER RAN" not in res.stdout, (args, res.stderr)
    assert not (tmp_path / "typo").exists()  # nothing created for a one-off upload


def test_sync_once_says_what_it_found(bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{bucket}/job"
    (tmp_path / "empty").mkdir()
    res = _cli("sync", "--once", "--local", str(tmp_path / "empty"), "--s3", uri)
    assert res.returncode == 0 and "holds 0 committed step(s); " + uri + " holds none" in res.stderr, res.stderr
    with CheckpointManager(tmp_path / "ckpt", metrics=False) as mgr:
        mgr.save(3, step_state(3, numel=64), blocking=True)
    for _ in range(2):  # the second pass has nothing to upload and says so too
        res = _cli("sync", "--once", "--local", str(tmp_path / "ckpt"), "--s3", uri)
        assert res.returncode == 0 and "holds 1 committed step(s) (newest 3); " + uri + " holds 1 (newest 3)" \
            in res.stderr, res.stderr
