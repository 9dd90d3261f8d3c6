"""The Hugging Face Trainer and Lightning under DDP (gloo, CPU) with 2 ranks on 2 hosts (two local
dirs, moto's S3): SIGTERM to one rank only -> every rank saves the same step and exits 0, and a
restart on fresh hosts from S3 ends bit-identical (weights and every step's loss) to an
uninterrupted run; a rank SIGKILLed in the middle of the framework's save -> the older step stays
the resume point, and the other rank ends too instead of hanging.

Each scenario's runs go in parallel where they do not depend on each other (the machine is small).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("accelerate")

from spotckpt.core.local import LocalStore  # noqa: E402
from spotckpt.remote.s3 import S3Store  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    count_prefix,
    finish_ranks,
    launch_ranks,
    read_lines_until,
    result_of,
)

HF = str(Path(__file__).with_name("hf_ranks.py"))
PL = str(REPO / "examples" / "lightning_fit.py")
STEPS = 30


def _host_steps(root: Path) -> list[int]:
    """The committed steps of one host, each file it holds verified (a host holds its share)."""
    store = LocalStore(root, create=False, cleanup=False)
    for s in store.committed_steps():
        held = {p.relative_to(store.step_path(s)).as_posix() for p in store.step_path(s).rglob("*") if p.is_file()}
        check = store.verify_step(s, files=held - {"manifest.json"})
        assert check.ok, (s, check.problems)
    return store.committed_steps()


def _env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SPOTCKPT_METRICS": "0", "SPOTCKPT_S3_URI": ""}


def _launch(script: str, root: Path, name: str, *extra: str) -> list:  # type: ignore[type-arg]
    """Two ranks, rank r on host ``root/{name}{r}``."""
    return launch_ranks(lambda r: [sys.executable, script, "--local-dir", str(root / f"{name}{r}"), "--steps",
                                   str(STEPS), "--save-steps", "10", *extra], 2, env=_env())


def _preempt_resume_and_kill(tmp_path: Path, bucket: str, script: str, tag: str, *, kill: list[str] | None) -> None:
    uri = f"s3://{bucket}/{tag}"
    ref = _launch(script, tmp_path, "ref", "--report", str(tmp_path / "ref.json"))
    run = _launch(script, tmp_path, "a", "--s3-uri", uri, "--step-sleep", "0.1", "--print-every", "1")
    dying = _launch(script, tmp_path, "k", *kill) if kill is not None else None
    try:
        read_lines_until(run[1], count_prefix(f"{tag}: step 12 "), what="step 12")
        run[1].send_signal(signal.SIGTERM)  # one rank only
    finally:
        results = finish_ranks(run)
    stopped = set()
    for code, _, err in results:
        assert code == 0, err[-3000:]
        stopped |= set(re.findall(r"preempted at step (\d+)", err))
    assert len(stopped) == 1, stopped  # both ranks: one and the same step
    step = int(stopped.pop())
    assert 12 <= step < STEPS
    store = S3Store(uri)
    try:
        assert store.list_steps()[-1] == step
        m = store.read_manifest(step)
        assert m.extra["world_size"] == 2 and store.missing_objects(step, m) == []
    finally:
        store.close()

    # fresh hosts, from S3: the same weights and every step's loss as the uninterrupted run
    again = finish_ranks(_launch(script, tmp_path, "b", "--s3-uri", uri, "--report", str(tmp_path / "res.json")))
    for code, out, err in again:
        assert code == 0, err[-3000:]
        assert re.search(rf"\[\d\]: starting at step {step} of {STEPS}", out), out[-2000:]
    for code, _, err in finish_ranks(ref):
        assert code == 0, err[-3000:]
    want, got = (json.loads((tmp_path / f).read_text()) for f in ("ref.json", "res.json"))
    assert len(got["losses"]) == STEPS and got["losses"] == want["losses"]
    assert got["weights"] == want["weights"]

    # SIGKILL of rank 1 in the middle of the save of step 20: step 10 stays the resume point on
    # both hosts, and rank 0 ends (an error, not a hang)
    if dying is None:
        return
    killed = finish_ranks(dying, timeout=180)
    assert killed[1][0] == -signal.SIGKILL, killed[1][2][-2000:]
    assert killed[0][0] != 0
    for r in (0, 1):
        assert _host_steps(tmp_path / f"k{r}") == [10]


def test_trainer_ddp_sigterm_one_rank_resume_from_s3_bitwise_and_kill_mid_save(tmp_path: Path, bucket: str) -> None:
    _preempt_resume_and_kill(tmp_path, bucket, HF, "hf_trainer", kill=["--die-in-save", "20"])


def test_lightning_ddp_sigterm_one_rank_resume_from_s3_bitwise(tmp_path: Path, bucket: str) -> None:
    _preempt_resume_and_kill(tmp_path, bucket, PL, "lightning_fit", kill=None)


def test_accelerate_loop_sigterm_one_rank_resume_from_s3_bitwise(tmp_path: Path, bucket: str) -> None:
    """The same guarantees for an Accelerate loop (save_state/load_state through
    AccelerateCheckpoints): the three runs in one process per rank."""
    child = str(Path(__file__).with_name("accelerate_child.py"))
    results = finish_ranks(launch_ranks(lambda r: [sys.executable, child, str(tmp_path), f"s3://{bucket}/acc"], 2,
                                        env=_env()))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    res = [result_of(out) for _, out, _ in results]
    a, b, ref = (res[0][k] for k in ("a", "b", "ref"))
    stopped = max(int(s) for s in a["losses"])
    assert res[0]["a"]["preempted"] and res[1]["a"]["preempted"]
    assert max(int(s) for s in res[1]["a"]["losses"]) == stopped and 5 <= stopped < 12  # the same step
    assert b["start"] == res[1]["b"]["start"] == stopped  # fresh hosts, from S3
    assert {**a["losses"], **b["losses"]} == ref["losses"] and len(ref["losses"]) == 12
    assert b["weights"] == ref["weights"] == res[1]["b"]["weights"]


def test_lightning_model_parallel_fsdp2_shards_of_every_rank_one_step_resume_bitwise(tmp_path: Path,
                                                                                     bucket: str) -> None:
    """ModelParallelStrategy (FSDP2) on CPU: Lightning writes each checkpoint as a folder of every
    rank's DCP shards, bypassing CheckpointIO; the callback adopts it on every rank as one step,
    SIGTERM to one rank saves the same step everywhere, and fresh hosts resume from S3
    bit-identical to an uninterrupted run (three runs in one process per rank)."""
    child = str(Path(__file__).with_name("pl_sharded_child.py"))
    uri = f"s3://{bucket}/pl_sharded"
    results = finish_ranks(launch_ranks(lambda r: [sys.executable, child, str(tmp_path), uri], 2, env=_env()))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    res = [result_of(out) for _, out, _ in results]
    stopped = max(int(s) for s in res[0]["a"]["losses"])
    assert 5 <= stopped < 10 and all(r["a"]["preempted"] for r in res), res
    assert all(max(int(s) for s in r["a"]["losses"]) == stopped for r in res)  # the same step on both ranks
    store = S3Store(uri)
    try:
        assert {3, stopped, 9} <= set(store.list_steps())  # the resumed run went on saving (9)
        m = store.read_manifest(stopped)
        assert m.extra["world_size"] == 2 and store.missing_objects(stopped, m) == []
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(m.files), sorted(m.files)
    finally:
        store.close()
    for r in res:  # fresh hosts, from S3: every step's loss and the full weights as uninterrupted
        assert r["b"]["start"] == stopped and r["a"]["start"] == r["ref"]["start"] == 0
        assert {**r["a"]["losses"], **r["b"]["losses"]} == r["ref"]["losses"] and len(r["ref"]["losses"]) == 10
        assert r["b"]["weights"] == r["ref"]["weights"]
    assert res[0]["b"]["weights"] == res[1]["b"]["weights"]
