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
from spotckpt.simulate import add_arguments, main_from_args, simulate

# A stand-in for a spotckpt trainer: keeps its step in S3 (so a fresh local dir still resumes),
# prints the restore metric line, writes the progress file the way the manager does, and on
# SIGTERM saves the step it reached and exits 0 -- or ignores SIGTERM with `ignore`.
FAKE_TRAINER = textwrap.dedent(
    """
    import os, signal, sys, time
    import boto3

    total, step_s, save_every, mode = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    local = os.environ["SPOTCKPT_LOCAL_DIR"]
    assert os.path.isdir(local) and not os.listdir(local), "local dir must be fresh and empty"
    bucket, _, prefix = os.environ["SPOTCKPT_S3_URI"][5:].partition("/")
    s3 = boto3.client("s3")
    key = prefix + "/fake/step"
    try:
        start = int(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        src = "s3"
    except s3.exceptions.NoSuchKey:
        start, src = 0, "none"
    print(f"spotckpt event=restore step={start} seconds=0.0100 source={src}", file=sys.stderr, flush=True)
    stop = []
    if mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    fd = os.open(os.environ["SPOTCKPT_EVENTS_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def save(step):
        d = os.path.join(local, f"step-{step:012d}")
        os.makedirs(d, exist_ok=True)
        s3.put_object(Bucket=bucket, Key=key, Body=str(step).encode())
        s3.put_object(Bucket=bucket, Key=f"{prefix}/step-{step:012d}/manifest.json", Body=b"{}")

    for step in range(start, total):
        time.sleep(step_s)
        os.write(fd, ('{"event":"progress","time":%.3f,"step":%d}\\n' % (time.time(), step + 1)).encode())
        if stop or (step + 1) % save_every == 0 or step + 1 == total:
            save(step + 1)
        if stop:
            print("saved on SIGTERM at", step + 1, flush=True)
            sys.exit(0)
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
    assert len(re.findall(r"interruption \d: reached step \d+, restored step \d+ -> lost 0 step", text)) == 2, text
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
    assert doc["instances"] == 2 and doc["final_step"] == 200
    (it,) = doc["interruptions"]
    assert it["last_step_reached"] >= 1 and it["restored_step"] == it["last_step_reached"]
    assert it["lost_steps"] == 0 and it["lost_seconds"] == 0.0 and it["killed_after_grace"] is False
    assert it["seconds_to_resume"] > 0 and it["downtime_seconds"] >= it["seconds_to_resume"]
    t, b = doc["TrainingTimeInSeconds"], doc["BillableTimeInSeconds"]
    assert 0 < b < t  # the 0.3 s wait for capacity is not billed
    assert doc["savings_percent"] == pytest.approx((1 - b / t) * 100, abs=0.01)


def test_conflicting_flags() -> None:
    with pytest.raises(ConfigError, match="conflict"):
        simulate([sys.executable, "-c", "pass"], interruptions=1, interrupt_every_seconds=5.0)


@pytest.mark.parametrize("cmd", [["no-such-command-spotckpt-xyz"], ["/nonexistent/train.py"], []])
def test_command_not_found(cmd: list[str]) -> None:
    with pytest.raises(ConfigError):
        simulate(cmd, interruptions=1)


@pytest.mark.parametrize("kw", [{"interruptions": -1}, {"interrupt_every_seconds": 0.0},
                                {"grace_seconds": 0.0}, {"max_wait_seconds": -5.0}])
def test_bad_numbers(kw: dict) -> None:
    with pytest.raises(ConfigError):
        simulate([sys.executable, "-c", "pass"], **kw)


def test_argparse_helpers(trainer: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--interruptions", "0", "--seed", "4", "--json", "--restart-delay", "0",
                              "--", sys.executable, str(trainer), "5", "0.01", "1000", "honour"])
    assert args.cmd[0] == "--" and args.seed == 4 and args.json
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
    monkeypatch.delenv("SPOTCKPT_METRICS", raising=False)  # simulate reads the restore metric line
    # paced (0.05 s a step, which changes no result) so both interruptions land mid-training
    rc = simulate([sys.executable, str(example), *args, "--step-sleep", "0.05"], interruptions=2, seed=0, grace_seconds=60,
                  restart_delay_seconds=0.2, stream=out)
    text = out.getvalue()
    trainer_output = capfd.readouterr().err
    assert rc == 0, text + trainer_output
    one = ["Starting", "Downloading", "Training"]
    assert STATUS_RE.findall(text) == one + ["Interrupted"] + one + ["Interrupted"] + one + [
        "Uploading", "Completed"], text
    assert len(re.findall(r"resumed from step [1-9]\d*", text)) == 2, text
    assert "TrainingTimeInSeconds" in text and "savings" in text
    assert f"weights {digest}" in trainer_output  # bitwise the same run
