"""`spotckpt simulate` tells the trainer its grace, reports a trainer that handled SIGTERM but was
killed before exiting as what it was, shows why a failed job failed (and no savings), and says
where checkpoints go and that the embedded server's data is gone. Real processes and signals."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from spotckpt.tools.simulate import simulate

# A trainer in the simulator's terms (events file, S3 via boto3), tiny: it checks that it was told
# the grace it gets, and on SIGTERM it handles the signal -- `preempted`, its step saved and in S3
# (`durable_s3`) -- and then hangs instead of exiting (a stuck interpreter teardown, say).
TRAINER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    import boto3
    total, want_grace = int(sys.argv[1]), sys.argv[2]
    if os.environ.get("SPOTCKPT_GRACE_SECONDS") != want_grace:
        sys.exit(f"told grace {os.environ.get('SPOTCKPT_GRACE_SECONDS')!r}, want {want_grace!r}")
    bucket, _, prefix = os.environ["SPOTCKPT_S3_URI"][5:].partition("/")
    s3, key = boto3.client("s3"), prefix + "/fake/step"
    fd = os.open(os.environ["SPOTCKPT_EVENTS_FILE"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    def event(name, **f):
        os.write(fd, (json.dumps({"event": name, "time": time.time(), **f}) + "\\n").encode())
    try:
        start = int(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        event("restore", step=start, seconds=0.01, source=os.environ["SPOTCKPT_S3_URI"], bytes=8)
    except s3.exceptions.NoSuchKey:
        start = 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    for step in range(start, total):
        time.sleep(0.03)
        event("progress", step=step + 1)
        if stop:
            event("preempted", step=step + 1, reason="signal_SIGTERM")
            s3.put_object(Bucket=bucket, Key=key, Body=str(step + 1).encode())
            s3.put_object(Bucket=bucket, Key=f"{prefix}/step-{step + 1:012d}/manifest.json", Body=b"{}")
            event("save", step=step + 1, stall_s=0.001, bytes=8, blocking=True)
            event("durable_s3", step=step + 1, seconds=0.01, bytes=8)
            time.sleep(3600)
    """
)

FAILING = "import sys; print('loading data', flush=True); sys.stderr.write('Traceback (most recent call last):\\nValueError: boom\\n'); sys.exit(3)"


@pytest.fixture
def trainer(tmp_path: Path) -> Path:
    p = tmp_path / "trainer.py"
    p.write_text(TRAINER)
    return p


@pytest.fixture
def no_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def test_grace_reaches_the_trainer_and_a_handled_sigterm_is_reported_as_such(trainer: Path, no_endpoint: None) -> None:
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "40", "2"], interruptions=1, total_steps=40, seed=2,
                  grace_seconds=2.0, restart_delay_seconds=0.0, stream=out)
    text = out.getvalue()
    assert rc == 0, text
    (line,) = [ln for ln in text.splitlines() if "interruption 1:" in ln]
    step = int(line.split("reached step ")[1].split(",")[0])
    assert f"[handled SIGTERM, step {step} in S3, killed before exiting]" in line, text
    assert "ignored SIGTERM" not in text
    assert f"trainer handled SIGTERM, step {step} in S3, killed with SIGKILL before exiting" in text
    # the same in the JSON document
    out = io.StringIO()
    rc = simulate([sys.executable, str(trainer), "40", "2"], interruptions=1, total_steps=40, seed=2,
                  grace_seconds=2.0, restart_delay_seconds=0.0, json_output=True, stream=out)
    (it,) = json.loads(out.getvalue())["interruptions"]
    assert rc == 0 and it["killed_after_grace"] is True
    assert it["sigterm_outcome"] == "handled-in-s3" and it["step_in_s3"] == it["last_step_reached"], it


def test_failed_job_shows_no_savings_and_the_trainers_last_output(no_endpoint: None) -> None:
    out = io.StringIO()
    assert simulate([sys.executable, "-c", FAILING], interruptions=1, stream=out) == 3
    text = out.getvalue()
    summary_part = text.split("\nSummary\n", 1)[1]
    assert "savings                n/a (the job failed)" in summary_part
    assert "(1 - BillableTimeInSeconds" not in summary_part
    # the last lines of its output, stdout and stderr together in the order written (one pipe)
    assert "    loading data\n    Traceback (most recent call last):\n    ValueError: boom\n" in summary_part
    out = io.StringIO()
    assert simulate([sys.executable, "-c", FAILING], interruptions=1, json_output=True, stream=out) == 3
    doc = json.loads(out.getvalue())
    assert doc["outcome"] == "Failed" and doc["savings_percent"] is None
    assert doc["stderr_tail"][-1] == "ValueError: boom"


def test_the_embedded_servers_data_is_said_to_be_gone(trainer: Path, no_endpoint: None) -> None:
    out = io.StringIO()
    assert simulate([sys.executable, str(trainer), "5", "10"], interruptions=0, stream=out) == 0
    last = out.getvalue().rstrip().splitlines()[-1]
    assert last.startswith("The embedded S3 server has stopped; its data (s3://") and last.endswith("is gone."), last


def test_s3_option_says_that_the_job_name_is_appended(trainer: Path, bucket: str) -> None:
    out = io.StringIO()
    assert simulate([sys.executable, str(trainer), "5", "10"], interruptions=0, s3_uri=f"s3://{bucket}/job1",
                    stream=out) == 0
    first = out.getvalue().splitlines()[0]
    assert f"checkpoints in s3://{bucket}/job1/sim-" in first
    assert "is appended to --s3" in first and "embedded" not in out.getvalue()
