"""Hugging Face Trainer + SpotckptCallback: real Trainer processes, real SIGTERM through
``spotckpt run``, moto's S3 server on 127.0.0.1.

Exactness: on CPU with one thread, a run interrupted mid-epoch and resumed from S3 on a fresh
machine ends with the same weights, bit for bit, as an uninterrupted one, and the same loss at
every step -- the Trainer restores the RNG states (``rng_state.pth``) and skips the batches it
already consumed (``skip_first_batches``), and the model has dropout on. Measured; asserted
bitwise. Both runs use OMP_NUM_THREADS=1: a different thread count changes the reduction order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from spotckpt import CheckpointManager  # noqa: E402
from spotckpt.remote.s3 import S3Store  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    assert_all_steps_verify,
    count_prefix,
    interrupted_under_run,
    read_lines_until,
)

EXAMPLE = REPO / "examples" / "hf_trainer.py"
SLOW_SAVE = Path(__file__).with_name("hf_slow_save.py")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SPOTCKPT_METRICS="0", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SPOTCKPT_S3_URI", None)
    return env


def _example(local: Path, *extra: str, cmd: Path = EXAMPLE) -> list[str]:
    return [sys.executable, str(cmd), "--local-dir", str(local), "--steps", "60", "--save-steps", "20", *extra]


def _report(path: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_sigterm_under_spotckpt_run_then_fresh_machine_resumes_from_s3_bitwise(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/hf"
    ref = subprocess.Popen(_example(tmp_path / "ref", "--report", str(tmp_path / "ref.json")), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    in_s3, err = interrupted_under_run(_example(tmp_path / "a", "--step-sleep", "0.03", "--print-every", "1"), uri,
                                       tmp_path / "a", env=_env(), tag="hf_trainer")
    stopped = in_s3[-1]
    assert 20 in in_s3 and stopped < 60, in_s3  # the periodic save and the preemption save
    assert S3Store(uri).read_manifest(stopped).extra["layout"] == "folder"

    # a fresh machine: empty local dir, a half-written checkpoint-59 left in the scratch output_dir
    junk = tmp_path / "b-trainer-output" / "checkpoint-59"
    junk.mkdir(parents=True)
    (junk / "model.safetensors").write_bytes(b"\0" * 100)
    again = subprocess.run([*_example(tmp_path / "b", "--s3-uri", uri, "--report", str(tmp_path / "res.json"))],
                           env=_env(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"hf_trainer: starting at step {stopped} of 60" in again.stdout
    assert ref.wait(timeout=300) == 0
    want, got = _report(tmp_path / "ref.json"), _report(tmp_path / "res.json")
    assert got["losses"] == want["losses"] and len(got["losses"]) == 60  # every step's loss, exactly
    assert got["weights"] == want["weights"]  # the same final weights, bit for bit
    # the resumed run's periodic saves are committed and uploaded too; save_total_limit=2 prunes
    # only the scratch output_dir, keep_last=3 the committed steps
    local = assert_all_steps_verify(tmp_path / "b")
    assert local[0] == stopped and local[-1] == 60 and (40 in local or stopped >= 40), local
    assert S3Store(uri).list_steps()[-1] == 60 and len(S3Store(uri).list_steps()) == 3
    assert len(list((tmp_path / "b-trainer-output").glob("checkpoint-*"))) <= 2


def test_signal_during_the_trainers_own_save(tmp_path: Path) -> None:
    """SIGTERM while the Trainer writes checkpoint-20: the save finishes, is committed (its
    ``preempted`` event says so, as for a SIGTERM between saves), and the process exits 0 --
    without a "Writing model shards" bar per save. SIGKILL at the same moment: checkpoint-20
    stays half-written in output_dir, and step 10 remains the resume point."""
    events = tmp_path / "events.jsonl"
    procs = {sig: subprocess.Popen([*_example(tmp_path / sig.name, "--slow-step", "20", cmd=SLOW_SAVE),
                                    "--save-steps", "10"],
                                   env=dict(_env(), SPOTCKPT_EVENTS_FILE=str(events)) if sig == signal.SIGTERM else _env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for sig in (signal.SIGTERM, signal.SIGKILL)}
    try:
        for sig, proc in procs.items():
            read_lines_until(proc, count_prefix("saving 20"), what="saving 20")
            proc.send_signal(sig)
        codes = {sig: proc.wait(timeout=120) for sig, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    err = procs[signal.SIGTERM].stderr.read()  # type: ignore[union-attr]
    assert codes[signal.SIGTERM] == 0, err[-3000:]
    assert "Writing model shards" not in err, err[-3000:]
    names = [(e["event"], e.get("step")) for e in map(json.loads, events.read_text().splitlines())]
    assert ("preempted", 20) in names, names
    assert names.index(("preempted", 20)) < names.index(("save", 20)), names  # announced before its save
    assert codes[signal.SIGKILL] == -signal.SIGKILL
    assert assert_all_steps_verify(tmp_path / "SIGTERM") == [10, 20]  # and training stopped there
    assert assert_all_steps_verify(tmp_path / "SIGKILL") == [10]
    half = tmp_path / "SIGKILL-trainer-output" / "checkpoint-20"
    assert half.is_dir() and not (half / "trainer_state.json").exists()  # what transformers would pick up
    with CheckpointManager(tmp_path / "SIGKILL", metrics=False) as mgr:
        assert mgr.restore_folder() == mgr.local.step_path(10)


def test_spotckpt_simulate_runs_the_example_through_an_interruption(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "spotckpt.tools.cli", "simulate", "--interruptions", "1", "--total-steps", "40",
                          "--seed", "3", "--restart-delay", "0", "--json", "--",
                          sys.executable, str(EXAMPLE), "--steps", "40", "--step-sleep", "0.02"],
                         env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    doc = json.loads(res.stdout)
    assert res.returncode == 0 and doc["outcome"] == "Completed", res.stderr[-3000:]
    (it,) = doc["interruptions"]
    assert it["restored_step"] == it["last_step_reached"] >= 1 and it["lost_steps"] == 0, it
    assert doc["final_step"] == 40 and doc["instances"] == 2


@pytest.mark.parametrize("which", ["trainer", "accelerate"])
def test_several_ranks_before_the_process_group_exists_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      which: str) -> None:
    from spotckpt import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    if which == "trainer":
        from spotckpt.integrations.transformers import SpotckptCallback

        spot = SpotckptCallback(local_dir=tmp_path / "ckpt")  # nothing is built yet
        with pytest.raises(ConfigError, match="not initialised.*build the Trainer"):
            spot.resume_path()
    else:
        from spotckpt.integrations.accelerate import AccelerateCheckpoints

        ckpt = AccelerateCheckpoints(object(), local_dir=tmp_path / "ckpt")
        with pytest.raises(ConfigError, match="not initialised.*build the Accelerator"):
            ckpt.restore()
    assert not (tmp_path / "ckpt").exists()  # refused before anything was created
