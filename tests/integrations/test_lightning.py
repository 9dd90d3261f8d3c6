"""PyTorch Lightning + SpotckptCallback / SpotckptCheckpointIO: real Lightning processes, real
SIGTERM through ``spotckpt run``, moto's S3 server on 127.0.0.1.

Exactness: a run interrupted mid-epoch and resumed from S3 on a fresh machine ends with the same
weights, bit for bit, and the same loss at every step, as an uninterrupted one (CPU, one thread).
That needs two things Lightning does not do by default, and the example does both: a data loader
with ``state_dict``/``load_state_dict`` (``spotckpt.data.ResumableDataLoader``; with a plain
``DataLoader`` Lightning restarts the epoch's data and warns "your dataloader is not resumable"),
and the RNG states, which Lightning does not checkpoint -- SpotckptCallback's ``state_dict``
carries them (without it, dropout draws other masks after the resume and the weights differ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pl = pytest.importorskip("pytorch_lightning")

from spotckpt import ConfigError  # noqa: E402
from spotckpt.remote.s3 import S3Store  # noqa: E402
from tests.helpers import REPO, assert_all_steps_verify, interrupted_under_run  # noqa: E402

EXAMPLE = REPO / "examples" / "lightning_fit.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SPOTCKPT_METRICS="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SPOTCKPT_S3_URI", None)
    return env


def _example(local: Path, *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--local-dir", str(local), "--steps", "60", "--save-steps", "20", *extra]


def test_sigterm_under_spotckpt_run_then_fresh_machine_resumes_from_s3_bitwise(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/pl"
    ref = subprocess.Popen(_example(tmp_path / "ref", "--report", str(tmp_path / "ref.json")), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    in_s3, err = interrupted_under_run(_example(tmp_path / "a", "--step-sleep", "0.03", "--print-every", "1"), uri,
                                       tmp_path / "a", env=_env(), tag="lightning_fit")
    stopped = in_s3[-1]
    assert 20 in in_s3 and stopped < 60, in_s3
    man = S3Store(uri).read_manifest(stopped)
    assert man.extra["layout"] == "folder" and list(man.files) == [f"preempted-step={stopped}.ckpt"]

    # a fresh machine: empty local dir, and a torn .ckpt newer than anything committed in dirpath
    dirpath = tmp_path / "b-lightning"
    dirpath.mkdir()
    (dirpath / "epoch=1-step=59.ckpt").write_bytes(b"PK\x03\x04 torn")
    again = subprocess.run(_example(tmp_path / "b", "--s3-uri", uri, "--report", str(tmp_path / "res.json")),
                           env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"lightning_fit: starting at step {stopped} of 60" in again.stdout
    for noise in ("The dirpath has changed", "LeafSpec"):  # a new machine's scratch dirpath; Lightning vs torch
        assert noise not in again.stderr, again.stderr[-3000:]
    assert ref.wait(timeout=300) == 0
    want, got = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "res.json").read_text())
    assert got["losses"] == want["losses"] and len(got["losses"]) == 60  # every step's loss, exactly
    assert got["weights"] == want["weights"]  # the same final weights, bit for bit
    # ModelCheckpoint's save_top_k=2 prunes its dirpath; keep_last=3 the committed steps
    local = assert_all_steps_verify(tmp_path / "b")
    assert local[0] == stopped and local[-1] == 60 and (40 in local or stopped >= 40), local
    assert S3Store(uri).list_steps()[-1] == 60 and len(S3Store(uri).list_steps()) == 3
    assert len(list(dirpath.glob("epoch=*.ckpt"))) <= 3  # two kept by top-k, plus the torn one


def test_callback_without_its_plugin_is_refused(tmp_path: Path) -> None:
    from spotckpt.integrations.lightning import SpotckptCallback

    spot = SpotckptCallback(local_dir=tmp_path / "ckpt", metrics=False, install_signal_handlers=False)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, callbacks=[spot])
    with pytest.raises(ConfigError, match="plugins=\\[spot.checkpoint_io\\]"):
        spot.setup(trainer, pl.LightningModule(), "fit")
    assert spot.manager.all_steps() == []
    spot.manager.close()


def test_several_ranks_before_the_process_group_exists_say_what_to_do(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from spotckpt.integrations.lightning import SpotckptCallback

    monkeypatch.setenv("WORLD_SIZE", "2")
    spot = SpotckptCallback(local_dir=tmp_path / "ckpt")  # nothing is built yet
    assert spot.local_dir == (tmp_path / "ckpt").absolute()
    with pytest.raises(ConfigError, match="not initialised.*init_process_group.*before resume_path"):
        spot.resume_path()
