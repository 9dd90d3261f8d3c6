"""Sharded framework strategies on CUDA, which do not run on CPU with the installed versions
(docs/integrations.md, "Tested where"):

- the Hugging Face Trainer with FSDP2 and ``SHARDED_STATE_DICT`` (on CPU, accelerate 1.16 keeps
  ``DistributedType.MULTI_CPU`` and the Trainer silently trains DDP instead);
- Lightning's ``FSDPStrategy(state_dict_type="sharded")`` (on CPU: "The strategy `fsdp` requires a
  GPU accelerator").

Each: one torchrun process per GPU (at most 2; one GPU runs a world of one); an interrupted run
(stopped after the save of step 6), a restart that resumes from the newest committed step, and an
uninterrupted run. Asserted: the committed step holds every rank's shard files (one manifest,
every file verified), the restart starts at 6, and every step's loss and the full weights equal
the uninterrupted run's. Skipped without CUDA (tests/conftest.py) or without the frameworks; run
by ``tests/gpu/check_frameworks.sh`` on a lent device."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spotckpt.core.local import LocalStore
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.gpu
CHILD = Path(__file__).with_name("fw_sharded_child.py")


def _torchrun(*args: str, nproc: int) -> None:
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SPOTCKPT_METRICS="0", SPOTCKPT_S3_URI="",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([*cmd, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), str(CHILD), *args], env=env, capture_output=True, text=True, cwd=REPO,
                         timeout=240)
    assert res.returncode == 0, res.stderr[-4000:] + res.stdout[-1000:]


def _interrupt_resume_compare(tmp_path: Path, framework: str, shard_files: list[str]) -> None:
    nproc = min(2, torch.cuda.device_count())
    _torchrun(framework, str(tmp_path / "a"), str(tmp_path / "a.json"), "6", nproc=nproc)
    store = LocalStore(tmp_path / "a", create=False, cleanup=False)
    assert store.committed_steps() == [3, 6]
    files = set(store.read_manifest(6).files)
    want = {f.format(r=r) for f in shard_files for r in range(nproc)}
    assert want <= files, sorted(files)  # every rank's shards, one step
    assert store.verify_step(6).ok
    _torchrun(framework, str(tmp_path / "a"), str(tmp_path / "b.json"), nproc=nproc)  # the restart
    _torchrun(framework, str(tmp_path / "ref"), str(tmp_path / "ref.json"), nproc=nproc)
    a, b, ref = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b", "ref"))
    assert a["start"] == 0 and b["start"] == 6
    assert {**a["losses"], **b["losses"]} == ref["losses"] and len(ref["losses"]) == 9
    assert b["weights"] == ref["weights"]


def test_trainer_fsdp2_sharded_state_dict_every_rank_one_step_resume_exact(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _interrupt_resume_compare(tmp_path, "trainer", ["pytorch_model_fsdp_0/__{r}_0.distcp",
                                                    "pytorch_model_fsdp_0/.metadata",
                                                    "optimizer_0/__{r}_0.distcp", "optimizer_0/.metadata",
                                                    "trainer_state.json"])


def test_lightning_fsdp_strategy_sharded_every_rank_one_step_resume_exact(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_lightning")
    _interrupt_resume_compare(tmp_path, "lightning", ["__{r}_0.distcp", ".metadata", "meta.pt"])
