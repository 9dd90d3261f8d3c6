"""The Hugging Face Trainer, Lightning and an Accelerate loop under DDP (gloo, CPU) with 2 ranks on
2 hosts (two local dirs, moto's S3), and Lightning's ModelParallelStrategy (FSDP2).

The Trainer and Lightning, each:
- the uninterrupted run: the unchanged example under a real ``torchrun --nproc_per_node 2`` (rank
  0 alone prints the last line), run once per module and shared by the two tests below;
- ``spotckpt simulate --hosts 2 --interruptions 2 -- torchrun --nproc_per_node 1 <example>``:
  SIGTERM to one host's torchrun reaches one rank only; every rank saves the same step and exits
  0; fresh hosts resume from S3; the final digests (weights, every step's loss) equal the
  uninterrupted run's;
- a rank SIGKILLed in the middle of the framework's save: the older step is the only one on every
  host and in S3, the other rank ends instead of hanging, and the restart resumes from it and
  ends bit-identical to the uninterrupted run.
The Accelerate loop and ModelParallelStrategy: the same (kill, restart, SIGTERM to one rank, fresh
hosts from S3, bitwise) with the runs of each rank in one process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("pytorch_lightning")
pytest.importorskip("accelerate")

from spotckpt.core.local import LocalStore  # noqa: E402
from spotckpt.remote.s3 import S3Store  # noqa: E402
from tests.helpers import (  # noqa: E402
    REPO,
    finish_ranks,
    free_port,
    launch_ranks,
    result_of,
)

HERE = Path(__file__).parent
EXAMPLES = {"hf_trainer": REPO / "examples" / "hf_trainer.py", "lightning_fit": REPO / "examples" / "lightning_fit.py"}
WRAPPERS = {"hf_trainer": HERE / "hf_ranks.py", "lightning_fit": HERE / "pl_ranks.py"}  # the example, + --die-in-save
STEPS = 30
ARGS = ["--steps", str(STEPS), "--save-steps", "10"]


def _host_steps(root: Path) -> list[int]:
    """The committed steps of one host, each file it holds verified (a host holds its share)."""
    store = LocalStore(root, create=False, cleanup=False)
    for s in store.committed_steps():
        held = {p.relative_to(store.step_path(s)).as_posix() for p in store.step_path(s).rglob("*") if p.is_file()}
        check = store.verify_step(s, files=held - {"manifest.json"})
        assert check.ok, (s, check.problems)
    return store.committed_steps()


def _env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "SPOTCKPT_METRICS": "0", "SPOTCKPT_S3_URI": "",
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _launch(script: Path, root: Path, name: str, *extra: str) -> list[subprocess.Popen[str]]:
    """Two ranks, rank r on host ``root/{name}{r}``."""
    return launch_ranks(lambda r: [sys.executable, str(script), "--local-dir", str(root / f"{name}{r}"), *ARGS,
                                   *extra], 2, env=_env())


class Reference:
    """The uninterrupted run of an example under ``torchrun --nproc_per_node 2``, started once
    per module when first asked for (in the background) and awaited when its result is needed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.results: dict[str, tuple[str, dict[str, object]]] = {}

    def start(self, tag: str) -> None:
        if tag in self.procs:
            return
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        report = self.root / f"{tag}.json"
        cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(EXAMPLES[tag]), *ARGS, "--local-dir", str(self.root / tag), "--report", str(report)]
        self.procs[tag] = subprocess.Popen(cmd, env=dict(os.environ, **_env()), stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True, cwd=REPO)

    def get(self, tag: str) -> tuple[str, dict[str, object]]:
        """(the one ``done at step ...`` line, the report: every step's loss and the weights)."""
        if tag not in self.results:
            self.start(tag)
            ((code, out, err),) = finish_ranks([self.procs[tag]])
            assert code == 0, err[-3000:]
            assert len(re.findall(rf"{tag}\[\d\]: starting at step 0 of {STEPS}", out)) == 2, out[-2000:]
            done = re.findall(rf"^{tag}: done at step .*$", out, re.M)
            assert len(done) == 1 and f"done at step {STEPS};" in done[0], out[-2000:]  # rank 0 only
            self.results[tag] = done[0], json.loads((self.root / f"{tag}.json").read_text())
        return self.results[tag]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    for proc in ref.procs.values():  # one never awaited (its test failed first)
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("tag", ["hf_trainer", "lightning_fit"])
def test_rank_killed_mid_save_older_step_everywhere_restart_resumes_bitwise(tmp_path: Path, bucket: str,
                                                                            reference: Reference, tag: str) -> None:
    """A rank SIGKILLed in the middle of the framework's save of step 20 (the Trainer: rank 1, its
    RNG file written; Lightning: rank 0, the .ckpt written): step 10 stays the only committed step
    on both hosts and nothing newer reaches S3; the other rank ends (an error, not a hang); the
    restart on those hosts resumes from step 10 and ends bit-identical (weights, every step's loss)
    to the uninterrupted run."""
    uri = f"s3://{bucket}/{tag}"
    script = WRAPPERS[tag]
    reference.start(tag)
    killed = finish_ranks(_launch(script, tmp_path, "h", "--s3-uri", uri, "--die-in-save", "20"), timeout=180)
    dead = 1 if tag == "hf_trainer" else 0
    assert killed[dead][0] == -signal.SIGKILL, killed[dead][2][-2000:]
    assert "dying in the save of 20" in killed[dead][1], killed[dead][1][-2000:]
    assert killed[1 - dead][0] not in (0, -signal.SIGKILL), killed[1 - dead][2][-2000:]
    for r in (0, 1):
        assert _host_steps(tmp_path / f"h{r}") == [10]
    store = S3Store(uri)
    try:
        assert set(store.list_steps()) <= {10}
    finally:
        store.close()

    again = finish_ranks(_launch(script, tmp_path, "h", "--s3-uri", uri, "--report", str(tmp_path / "res.json")))
    for r, (code, out, err) in enumerate(again):
        assert code == 0, err[-3000:]
        assert f"{tag}[{r}]: starting at step 10 of {STEPS}" in out, out[-2000:]
    _, want = reference.get(tag)
    got = json.loads((tmp_path / "res.json").read_text())
    assert len(got["losses"]) == STEPS and got["losses"] == want["losses"]
    assert got["weights"] == want["weights"]


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["hf_trainer", "lightning_fit"])
def test_simulate_two_hosts_two_interruptions_ends_as_uninterrupted_torchrun(tmp_path: Path, reference: Reference,
                                                                            tag: str) -> None:
    """``spotckpt simulate --hosts 2 --interruptions 2 -- torchrun --nproc_per_node 1 <example>``:
    each interruption is SIGTERM to one host's torchrun, which passes it to its one worker -- one
    rank only; every rank saves the same step and exits 0; the job restarts on fresh hosts (empty
    local dirs) from S3 (simulate's embedded server) and ends with the weights and losses digests
    (every step's loss) of the uninterrupted ``torchrun --nproc_per_node 2`` run."""
    reference.start(tag)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    sim = subprocess.run(
        [sys.executable, "-m", "spotckpt.tools.cli", "simulate", "--hosts", "2", "--interruptions", "2",
         "--total-steps", str(STEPS), "--grace", "60", "--seed", "3", "--restart-delay", "0", "--",
         torchrun, "--nproc_per_node", "1", str(EXAMPLES[tag]), *ARGS, "--step-sleep", "0.05"],
        env=dict(os.environ, **_env(), TMPDIR=str(tmp_path)), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert sim.returncode == 0, sim.stderr[-3000:] + sim.stdout[-2000:]
    assert f"instances              3, final step {STEPS}, outcome Completed" in sim.stdout, sim.stdout
    assert sim.stdout.count("spot capacity reclaimed: host") == 2, sim.stdout  # one host taken away, twice
    assert sim.stdout.count("trainer exited with status 0") == 2, sim.stdout  # every host's ranks exit 0
    reached = re.findall(r"interruption \d: at step \d+, reached step (\d+), restored step (\d+) -> lost 0 step",
                         sim.stdout)
    assert len(reached) == 2 and all(a == b for a, b in reached), sim.stdout
    stops = re.findall(r"preempted at step (\d+)", sim.stderr)  # both hosts saved the step restored next
    assert sorted(stops) == sorted(2 * [b for _, b in reached]), stops
    done = re.findall(rf"{tag}: done at step .*", sim.stderr)
    want, _ = reference.get(tag)
    assert done == [want], (done, want)  # rank 0 only, the same digests


def test_accelerate_loop_kill_mid_save_restart_sigterm_one_rank_resume_from_s3_bitwise(tmp_path: Path,
                                                                                     bucket: str) -> None:
    """The same chain for an Accelerate loop (save_state/load_state through
    AccelerateCheckpoints), saving every 4 of 12 steps: rank 1 SIGKILLed in the middle of the save
    of step 8 -> step 4 on both hosts, rank 0 ends; then, in one process per rank, the restart on
    those hosts (from step 4) with SIGTERM to rank 1 only, fresh hosts from S3, and the
    uninterrupted run."""
    child = str(HERE / "accelerate_child.py")
    uri = f"s3://{bucket}/acc"
    killed = finish_ranks(launch_ranks(lambda r: [sys.executable, child, str(tmp_path), uri, "kill"], 2, env=_env()),
                          timeout=180)
    assert killed[1][0] == -signal.SIGKILL, killed[1][2][-2000:]
    assert killed[0][0] not in (0, -signal.SIGKILL), killed[0][2][-2000:]
    for r in (0, 1):
        assert _host_steps(tmp_path / f"h{r}") == [4]
    store = S3Store(uri)
    try:
        assert set(store.list_steps()) <= {4}
    finally:
        store.close()

    results = finish_ranks(launch_ranks(lambda r: [sys.executable, child, str(tmp_path), uri], 2, env=_env()))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    res = [result_of(out) for _, out, _ in results]
    stopped = max(int(s) for s in res[0]["a"]["losses"])
    assert 6 <= stopped < 12 and all(r["a"]["preempted"] for r in res), res
    assert all(max(int(s) for s in r["a"]["losses"]) == stopped for r in res)  # the same step on both ranks
    store = S3Store(uri)
    try:
        m = store.read_manifest(stopped)
        assert m.extra["world_size"] == 2 and store.missing_objects(stopped, m) == []
    finally:
        store.close()
    for r in res:
        assert r["a"]["start"] == 4 and r["b"]["start"] == stopped  # the restart, then fresh hosts from S3
        assert {**r["a"]["losses"], **r["b"]["losses"]} == {k: v for k, v in r["ref"]["losses"].items()
                                                             if int(k) > 4} and len(r["ref"]["losses"]) == 12
        assert r["b"]["weights"] == r["ref"]["weights"]
    assert res[0]["b"]["weights"] == res[1]["b"]["weights"]


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
