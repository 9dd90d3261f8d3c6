"""`spotckpt simulate` end to end: real processes, real signals, a real S3 endpoint (embedded moto)."""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from spotckpt.errors import ConfigError
from spotckpt.tools.simulate import add_arguments, main_from_args, simulate

# A stand-in for a spotckpt trainer: keeps its step in S3 (so a fresh local dir still resumes) and
# writes the events the manager writes to $SPOTCKPT_EVENTS_FILE (a restore event when it resumed, a
# progress event per step, a save event per save) -- and nothing the simulator reads on its output.
# Optionally it lingers after its last step, as a trainer does while its final save uploads.
# On SIGTERM it saves the step it reached and exits 0 -- or ignores SIGTERM with `ignore`.
FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import boto3

    total, step_s, save_every, mode = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    linger = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0  # seconds after the last step (a final upload)
    local = os.environ["SPOTCKPT_LOCAL_DIR"]
    assert os.path.isdir(local) and not os.listdir(local), "local dir must be fresh and empty"
    bucket, _, prefix = os.environ["SPOTCKPT_S3_URI"][5:].partition("/")
    s3 = boto3.client("s3")
    key = prefix + "/fake/step"
    fd = os.open(os.environ["SPOTCKPT_EVENTS_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(name, **fields):
        os.write(fd, (json.dumps({"event": name, "time": time.time(), **fields}) + "\\n").encode())

    try:
        start = int(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        event("restore", step=start, seconds=0.01, source=os.environ["SPOTCKPT_S3_URI"], bytes=8)
    except s3.exceptions.NoSuchKey:
        start = 0  # like the manager: nothing restored, no restore event
    stop = []
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))

    def save(step):
        d = os.path.join(local, f"step-{step:012d}")
        os.makedirs(d, exist_ok=True)
        s3.put_object(Bucket=bucket, Key=key, Body=str(step).encode())
        s3.put_object(Bucket=bucket, Key=f"{prefix}/step-{step:012d}/manifest.json", Body=b"{}")
        event("save", step=step, stall_s=0.001, bytes=8, blocking=True)

    for step in range(start, total):
        time.sleep(step_s)
        event("progress", step=step + 1)
        if stop or (step + 1) % save_every == 0 or step + 1 == total:
            save(step + 1)
        if stop:
            print("saved on SIGTERM at", step + 1, flush=True)
            sys.exit(0)
    time.sleep(linger)
    print("done", flush=True)
    """
)


@pytest.fixture
def trainer(tmp_path: Path) -> Path:
    p = tmp_path / "fake_trainer.py"
    p.write_text(FAKE_TRAINER)
    return p


@pytest.fixture(autouse=True)
def _no_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    # The embedded S3 server is what is under test here.
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


STATUS_RE = re.compile(r"^\S+Z\s+[\d.]+s\s+(\w+)", re.M)


def assert_interruptions_during_training(doc: dict, final_step: int) -> None:
    """The invariants of every simulated job that completed: the real final step, and every
    interruption landed while the trainer was training (before its final step)."""
    assert doc["final_step"] == final_step, doc
    for it in doc["interruptions"]:
        assert it["step_at_interruption"] is not None and it["step_at_interruption"] < final_step, it
        assert it["during_training"] is True, it
        assert it["restored_step"] is not None and it["restored_step"] <= it["last_step_reached"], it
    assert doc["instances"] == len(doc["interruptions"]) + 1


def test_two_interruptions_resume_and_complete(trainer: Path) -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "300", "0.02", "1000", "honour"], interruptions=2,
                  seed=3, grace_seconds=30, restart_delay_seconds=0.2, stream=out)
    text = out.getvalue()
    assert rc == 0, text
    statuses = STATUS_RE.findall(text)
    one = ["Starting", "Downloading", "Training"]
    assert statuses == one + ["Interrupted"] + one + ["Interrupted"] + one + ["Uploading", "Completed"], text
    assert "TrainingTimeInSeconds" in text and "BillableTimeInSeconds" in text
    assert "(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100" in text
    assert "assuming spot price = 0.3 x on-demand" in text
    found = re.findall(r"interruption \d: at step (\d+), reached step (\d+), restored step (\d+) -> lost 0 step", text)
    assert len(found) == 2, text
    assert all(int(at) < 300 and int(reached) == int(restored) for at, reached, restored in found), text
    assert "final step 300," in text
    assert "newest step 300" in text  # Uploading lists what is durable in S3


def test_json_document(trainer: Path) -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "200", "0.02", "1000", "honour"], interruptions=1,
                  seed=1, grace_seconds=30, restart_delay_seconds=0.3, json_output=True, stream=out)
    doc = json.loads(out.getvalue())  # exactly one JSON document, nothing else on the stream
    assert rc == 0 and doc["outcome"] == "Completed" and doc["exit_code"] == 0
    assert [e["status"] for e in doc["events"]] == [
        "Starting", "Downloading", "Training", "Interrupted",
        "Starting", "Downloading", "Training", "Uploading", "Completed"]
    assert_interruptions_during_training(doc, 200)
    (it,) = doc["interruptions"]
    assert it["last_step_reached"] >= 1 and it["restored_step"] == it["last_step_reached"]
    assert it["lost_steps"] == 0 and it["lost_seconds"] == 0.0 and it["killed_after_grace"] is False
    assert it["seconds_to_resume"] > 0 and it["downtime_seconds"] >= it["seconds_to_resume"]
    t, b, inst = doc["TrainingTimeInSeconds"], doc["BillableTimeInSeconds"], doc["instance_seconds"]
    assert 0 < inst < t  # the 0.3 s wait for capacity is not billed
    assert doc["spot_price_ratio"] == 0.3 and b == pytest.approx(inst * 0.3, abs=0.002)
    assert "0.3 x on-demand" in doc["savings_assumption"]
    assert doc["savings_percent"] == pytest.approx((1 - b / t) * 100, abs=0.01)
    assert doc["savings_from_waits_only_percent"] == pytest.approx((1 - inst / t) * 100, abs=0.01)


def test_total_steps_places_interruptions_inside_a_short_run(trainer: Path) -> None:
    # 40 steps, then 1.5 s of "final upload": with the final step known, both interruptions land
    # at steps inside the run, in order -- never while the trainer is finishing.
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "40", "0.03", "1000", "honour", "1.5"], interruptions=2,
                  total_steps=40, seed=5, grace_seconds=30, restart_delay_seconds=0.0, spot_price_ratio=1.0,
                  json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed", doc
    assert len(doc["interruptions"]) == 2, doc
    assert_interruptions_during_training(doc, 40)
    first, second = doc["interruptions"]
    assert first["step_at_interruption"] < second["step_at_interruption"] < 40
    assert doc["BillableTimeInSeconds"] == doc["instance_seconds"]  # ratio 1: only the waits are saved


def test_a_trainer_that_finishes_first_is_not_interrupted_after_its_last_step(trainer: Path) -> None:
    # The new user's demo: training (10 steps, 0.1 s) is over before the first interruption is due
    # (0.5-2 s after first progress) while the process still runs (2 s final upload). No interruption
    # may land then; the summary says fewer happened and shows the real final step.
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "10", "0.01", "1000", "honour", "2.0"], interruptions=2,
                  seed=0, grace_seconds=30, restart_delay_seconds=0.0, json_output=True, stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed", doc
    assert doc["interruptions"] == [] and doc["instances"] == 1
    assert doc["final_step"] == 10
    assert "0 of 2 interruptions happened: the job finished first" in doc["notes"]


def test_hard_kill_fraction_kills_without_notice_and_splits_the_wasted_time(trainer: Path) -> None:
    # Every interruption a host lost: SIGKILL with no SIGTERM, so the trainer (saving every 10
    # steps) makes no final save and the next instance resumes from its last periodic step.
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "60", "0.02", "10", "honour"], interruptions=1, total_steps=60,
                  seed=2, grace_seconds=30, restart_delay_seconds=0.0, hard_kill_fraction=1.0, json_output=True,
                  stream=out)
    doc = json.loads(out.getvalue())
    assert rc == 0 and doc["outcome"] == "Completed", doc
    assert_interruptions_during_training(doc, 60)
    (it,) = doc["interruptions"]
    assert it["notice"] is False and it["sigterm_outcome"] == "no-notice" and it["killed_after_grace"] is True
    assert it["restored_step"] % 10 == 0 and it["lost_steps"] == it["last_step_reached"] - it["restored_step"]
    assert doc["interruptions_without_notice"] == 1 and doc["hard_kill_fraction"] == 1.0
    w = doc["wasted_seconds"]
    assert w["checkpoint_stalls"] > 0 and w["lost_work"] == doc["lost_seconds_total"]
    assert w["restart_restore"] == it["seconds_to_resume"] > 0
    assert w["total"] == pytest.approx(w["checkpoint_stalls"] + w["lost_work"] + w["restart_restore"], abs=0.002)
    assert "no notice" in doc["events"][3]["message"] or "without notice" in doc["events"][3]["message"]


def test_interrupt_every_steps_meets_two_save_intervals_with_the_same_interruptions(trainer: Path) -> None:
    # Two trainers that save every 5 and every 25 steps: the same seed interrupts both at the same
    # training steps (the simulator polls, so at the target step or a little after), with the same
    # kinds, however much work each one lost.
    from spotckpt.tools.simulate.schedule import Scheduler

    docs = []
    for save_every in ("5", "25"):
        out = io.StringIO()
        rc = simulate([sys.executable, str(trainer), "120", "0.01", save_every, "honour"], interrupt_every_steps=30,
                      step_seconds=0.01, total_steps=120, seed=3, hard_kill_fraction=0.5, grace_seconds=30,
                      restart_delay_seconds=0.0, json_output=True, stream=out)
        doc = json.loads(out.getvalue())
        assert rc == 0 and doc["outcome"] == "Completed", doc
        assert_interruptions_during_training(doc, 120)
        starting = [e["message"] for e in doc["events"] if e["status"] == "Starting"]
        # what the trainer is told (3600 s / (30 steps x 0.01 s)), said once, at the first instance
        assert "the trainer is told SPOTCKPT_INTERRUPTIONS=per_hour=12000,hard_fraction=0.5" in starting[0]
        assert not any("SPOTCKPT_INTERRUPTIONS" in m for m in starting[1:])
        docs.append(doc)
    sch = Scheduler(interruptions=None, every_seconds=None, every_steps=30, seed=3, total_steps=120,
                    hard_kill_fraction=0.5)
    planned = [(t.at_step, t.notice) for t in (sch.plan(n, []) for n in range(1, 10)) if t is not None]
    assert len(planned) >= 2 and any(not k for _, k in planned), planned
    for doc in docs:
        its = doc["interruptions"]
        assert [i["notice"] for i in its] == [k for _, k in planned]
        for it, (at, _) in zip(its, planned):
            assert at <= it["step_at_interruption"] <= at + 15, (it, at)
        assert doc["interrupt_every_steps"] == 30 and doc["interrupt_every_seconds"] is None
    lost = [sum(i["lost_steps"] for i in d["interruptions"] if not i["notice"]) for d in docs]
    assert lost[0] < lost[1]  # saving every 25 steps lost more at the same kills


def test_conflicting_flags() -> None:
    with pytest.raises(ConfigError, match="conflict"):
        simulate([sys.executable, "-c", "pass"], interruptions=1, interrupt_every_seconds=5.0)
    with pytest.raises(ConfigError, match="conflict"):
        simulate([sys.executable, "-c", "pass"], interrupt_every_steps=10, interrupt_every_seconds=5.0)
    with pytest.raises(ConfigError, match="only goes with"):
        simulate([sys.executable, "-c", "pass"], interrupt_every_seconds=5.0, step_seconds=0.1)


@pytest.mark.parametrize("cmd", [["no-such-command-spotckpt-xyz"], ["/nonexistent/train.py"], []])
def test_command_not_found(cmd: list[str]) -> None:
    with pytest.raises(ConfigError):
        simulate(cmd, interruptions=1)


@pytest.mark.parametrize("kw", [{"interruptions": -1}, {"interrupt_every_seconds": 0.0},
                                {"grace_seconds": 0.0}, {"max_wait_seconds": -5.0}, {"total_steps": 0},
                                {"spot_price_ratio": 0.0}, {"spot_price_ratio": 1.5}, {"hard_kill_fraction": 1.5},
                                {"interrupt_every_steps": 1}, {"interrupt_every_steps": 10, "step_seconds": 0.0},
                                {"s3_uri": "s3://Not_A_Bucket/x"}])
def test_bad_numbers(kw: dict) -> None:
    with pytest.raises(ConfigError):
        simulate([sys.executable, "-c", "pass"], **kw)


def test_argparse_helpers(trainer: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--interruptions", "0", "--seed", "4", "--json", "--restart-delay", "0",
                              "--spot-price-ratio", "0.5", "--total-steps", "5",
                              "--", sys.executable, str(trainer), "5", "0.01", "1000", "honour"])
    assert args.cmd[0] == "--" and args.seed == 4 and args.json
    assert args.spot_price_ratio == 0.5 and args.total_steps == 5
    assert main_from_args(args) == 0
    args = parser.parse_args(["--interruptions", "1", "--interrupt-every", "3", "--", sys.executable])
    with pytest.raises(ConfigError, match="conflict"):
        main_from_args(args)


def test_failing_trainer_reports_failed() -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, "-c", "import sys; sys.exit(7)"], interruptions=1, stream=out)
    assert rc == 7
    assert STATUS_RE.findall(out.getvalue())[-1] == "Failed"


@pytest.mark.slow
def test_toy_example_end_to_end(capfd: pytest.CaptureFixture[str], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's main job: the real example through the real manager, S3 and two interruptions,
    ending with the same weights as an uninterrupted run."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    example = repo / "examples" / "train_toy.py"
    args = ["--steps", "60", "--workers", "2", "--every-steps", "20"]
    env = dict(os.environ, PYTHONPATH=str(repo), SPOTCKPT_METRICS="0")
    env.pop("SPOTCKPT_S3_URI", None)
    ref = subprocess.run([sys.executable, str(example), *args, "--local-dir", str(tmp_path / "ref")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    digest = re.search(r"weights ([0-9a-f]{16})", ref.stdout).group(1)  # type: ignore[union-attr]

    out = io.StringIO()
    monkeypatch.setenv("PYTHONPATH", str(repo))
    monkeypatch.setenv("SPOTCKPT_METRICS", "0")  # no metric lines: simulate follows the events file only
    # paced (0.05 s a step, which changes no result); --total-steps keeps both interruptions in the run
    rc = simulate([sys.executable, str(example), *args, "--step-sleep", "0.05"], interruptions=2,
                  total_steps=60, seed=0, grace_seconds=60, restart_delay_seconds=0.2, stream=out)
    text = out.getvalue()
    trainer_output = capfd.readouterr().err
    assert rc == 0, text + trainer_output
    one = ["Starting", "Downloading", "Training"]
    assert STATUS_RE.findall(text) == one + ["Interrupted"] + one + ["Interrupted"] + one + [
        "Uploading", "Completed"], text
    assert len(re.findall(r"resumed from step [1-9]\d*", text)) == 2, text
    assert "final step 60," in text and "[after the final step]" not in text
    assert "TrainingTimeInSeconds" in text and "savings" in text
    assert f"weights {digest}" in trainer_output  # bitwise the same run
