"""``spotckpt simulate``: the managed-spot lifecycle, interruption by interruption, on one machine.

What it does::

    Starting     a new "instance": a fresh, EMPTY local checkpoint dir
    Downloading  CMD started in its own process group; it restores the newest checkpoint from S3
    Training     the trainer made progress (a restore metric line or the progress file advanced)
    Interrupted  SIGTERM to CMD's process group; SIGKILL after the grace if it is still running
    (Starting -> Downloading -> Training -> Interrupted)* ...
    Uploading    CMD exited 0: the checkpoints durable in S3 are listed
    Completed
  or Stopping -> MaxWaitTimeExceeded when ``max_wait_seconds`` runs out,
  or Failed when CMD exits non-zero without being interrupted.

S3 is moto's server embedded on 127.0.0.1 (a bucket is created) unless ``s3_uri`` is given or
``$AWS_ENDPOINT_URL`` is set (then a bucket ``spotckpt-simulate`` is created there if needed).
CMD's environment: ``SPOTCKPT_LOCAL_DIR`` (the fresh dir), ``SPOTCKPT_S3_URI``
(``s3://<bucket>/<job>``), ``AWS_ENDPOINT_URL`` and dummy credentials (embedded server only),
``SPOTCKPT_EVENTS_FILE`` (the manager appends a ``progress`` event there on every
``maybe_save``), ``TRAINING_JOB_NAME`` and ``PYTHONUNBUFFERED=1``.

When interruptions happen (seeded, ``random.Random(seed)``): never before the instance has made
progress (its progress file advanced), so every restart has something to resume.

- ``interruptions=N`` (a demo; the default is 2): the first N instances are each interrupted a
  random 0.5-2 s after their first progress. If CMD finishes first, fewer happen (reported).
- ``interrupt_every_seconds=S``: every instance is interrupted a random ``U(0.5, 1.5) * S`` seconds
  after its first progress, for as long as the job runs (stopping after 3 restarts in a row that
  resumed from no newer step, which would loop forever).

The summary, in SageMaker's terms, with the definitions used in a simulation:

- ``TrainingTimeInSeconds``: wall time of the whole job, first ``Starting`` to the end (includes
  the simulated wait for spot capacity between an interruption and the next ``Starting``,
  ``restart_delay_seconds``).
- ``BillableTimeInSeconds``: the time instances actually ran CMD (sum over instances of process
  start to exit).
- savings: ``(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100``, SageMaker's formula. (On
  real spot the saving comes mostly from the spot price; here it shows only the unbilled waits.)
- per interruption: the last step reached (progress file) and the step the next instance restored
  (its ``spotckpt event=restore step=N`` metric line, else the first progress step - 1); the
  progress lost in steps (``reached - restored``) and in seconds (training time between the
  restored and the last reached step, as measured in the interrupted instance); whether SIGKILL was
  needed; ``seconds_to_resume`` (``Starting`` to ``Training`` of the next instance) and
  ``downtime_seconds`` (``Interrupted`` to ``Training``).

Exit status: 0 when the final run of CMD exits 0; CMD's status when it fails on its own (1 when it
died of a signal); 3 for ``MaxWaitTimeExceeded``. Bad input (CMD not found, conflicting options)
raises :class:`~spotckpt.errors.ConfigError`.

Threads: :func:`simulate` runs on the caller's thread; two ``spotckpt-sim-output`` threads per
instance copy CMD's stdout/stderr to a log file (and to this process's stderr unless
``json_output``) and pick out the restore metric line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TextIO

from .errors import ConfigError, SpotCkptError
from .sidecar import forward_signal

__all__ = ["simulate", "add_arguments", "main_from_args", "EXIT_MAX_WAIT"]

#: Exit status of ``spotckpt simulate`` when the wait budget ran out (``MaxWaitTimeExceeded``).
EXIT_MAX_WAIT = 3
DEFAULT_INTERRUPTIONS = 2
_DEMO_DELAY_SECONDS = (0.5, 2.0)
_EVERY_JITTER = (0.5, 1.5)
_POLL_SECONDS = 0.05
_NO_PROGRESS_RESTARTS = 3
_BUCKET = "spotckpt-simulate"
_METRIC_RE = re.compile(r"\bspotckpt event=(\w+)((?:\s+\w+=\S+)*)")


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class _Instance:
    """One (re)start of CMD: what the simulator saw of it."""

    number: int
    local_dir: str
    started: float
    restored_step: int | None = None
    restore_fields: dict[str, str] = field(default_factory=dict)
    restore_seen_at: float | None = None
    training_at: float | None = None
    progress: list[tuple[int, float]] = field(default_factory=list)  # distinct values seen, in order
    first_progress_seen_at: float | None = None
    ended: float | None = None
    exit_code: int | None = None
    interrupted: bool = False
    killed: bool = False
    sigterm_at: float | None = None

    @property
    def first_progress(self) -> tuple[int, float] | None:
        return self.progress[0] if self.progress else None

    @property
    def last_progress(self) -> tuple[int, float] | None:
        return self.progress[-1] if self.progress else None


class _Output:
    """Copies one pipe of CMD line by line; notes ``spotckpt event=restore`` (reader thread)."""

    def __init__(self, pipe: IO[bytes], log_file: IO[bytes], echo: TextIO | None, inst: _Instance, lock: threading.Lock) -> None:
        self._pipe, self._log, self._echo, self._inst, self._lock = pipe, log_file, echo, inst, lock
        self.thread = threading.Thread(target=self._run, name="spotckpt-sim-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for raw in iter(self._pipe.readline, b""):
            with self._lock:
                self._log.write(raw)
                if self._echo is not None:
                    try:
                        self._echo.write(f"  | {raw.decode('utf-8', 'replace').rstrip()}\n")
                        self._echo.flush()
                    except (OSError, ValueError):
                        pass
                m = _METRIC_RE.search(raw.decode("utf-8", "replace"))
                if m and m.group(1) == "restore" and self._inst.restore_seen_at is None:
                    fields = dict(kv.split("=", 1) for kv in m.group(2).split())
                    self._inst.restore_fields = fields
                    self._inst.restore_seen_at = time.time()
                    try:
                        self._inst.restored_step = int(fields.get("step", ""))
                    except ValueError:
                        self._inst.restored_step = 0  # e.g. step=none: nothing to restore
        self._pipe.close()


def _read_progress(path: Path) -> tuple[int, float] | None:
    """The newest ``progress`` event (step, unix time) in the trainer's events file."""
    from .events import ProgressEvent, parse_event_line

    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        ev = parse_event_line(line)
        if isinstance(ev, ProgressEvent) and ev.step is not None:
            return ev.step, ev.time
    return None


class _Simulation:
    """State of one simulated job; runs on the caller's thread."""

    def __init__(self, cmd: list[str], *, interruptions: int | None, every: float | None, seed: int,
                 grace: float, max_wait: float | None, json_output: bool, s3_uri: str | None,
                 restart_delay: float, stream: TextIO) -> None:
        self.cmd = cmd
        self.interruptions = interruptions
        self.every = every
        self.rng = random.Random(seed)
        self.seed = seed
        self.grace = grace
        self.max_wait = max_wait
        self.json_output = json_output
        self.s3_uri_arg = s3_uri
        self.restart_delay = restart_delay
        self.stream = stream
        self.events: list[dict[str, Any]] = []
        self.instances: list[_Instance] = []
        self.lock = threading.Lock()
        self.job = f"sim-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.job_start = 0.0
        self.env: dict[str, str] = {}
        self.s3_uri = ""
        self.endpoint: str | None = None
        self._server: Any = None
        self.work = Path(tempfile.mkdtemp(prefix="spotckpt-sim-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.outcome = ""
        self.notes: list[str] = []

    # -- output ----------------------------------------------------------------------------
    def status(self, name: str, message: str = "") -> None:
        t = time.time()
        self.events.append({"status": name, "time": _now_iso(t), "elapsed_seconds": round(t - self.job_start, 3),
                            "message": message})
        if not self.json_output:
            with self.lock:
                self.stream.write(f"{_now_iso(t)} {t - self.job_start:8.2f}s  {name:<20} {message}\n".rstrip() + "\n")
                self.stream.flush()

    # -- S3 --------------------------------------------------------------------------------
    def setup_s3(self) -> None:
        base_env = dict(os.environ)
        if self.s3_uri_arg:
            if not self.s3_uri_arg.startswith("s3://") or len(self.s3_uri_arg) <= 5:
                raise ConfigError(f"--s3 must look like s3://bucket/prefix, got {self.s3_uri_arg!r}")
            self.s3_uri = self.s3_uri_arg.rstrip("/") + "/" + self.job
            self.endpoint = base_env.get("AWS_ENDPOINT_URL")
        elif base_env.get("AWS_ENDPOINT_URL"):
            self.endpoint = base_env["AWS_ENDPOINT_URL"]
            self._create_bucket(_BUCKET, creds=False)
            self.s3_uri = f"s3://{_BUCKET}/{self.job}"
        else:
            try:
                from moto.server import ThreadedMotoServer
            except ImportError as exc:
                raise ConfigError(
                    "the embedded S3 needs moto's server (pip install 'moto[server]'), or point "
                    "AWS_ENDPOINT_URL at an S3 endpoint, or pass --s3 s3://bucket/prefix"
                ) from exc
            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            self._server.start()
            host, port = self._server.get_host_and_port()
            self.endpoint = f"http://{host}:{port}"
            base_env.update(AWS_ENDPOINT_URL=self.endpoint, AWS_ACCESS_KEY_ID="testing",
                            AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
            base_env.pop("AWS_PROFILE", None)
            base_env.pop("AWS_SESSION_TOKEN", None)
            self._create_bucket(_BUCKET, creds=True)
            self.s3_uri = f"s3://{_BUCKET}/{self.job}"
        self.env = base_env

    def _client(self, *, creds: bool) -> Any:
        import boto3

        kw: dict[str, Any] = {"endpoint_url": self.endpoint} if self.endpoint else {}
        if creds:
            kw.update(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
        return boto3.client("s3", **kw)

    def _create_bucket(self, name: str, *, creds: bool) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client(creds=creds).create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise SpotCkptError(f"cannot create bucket {name!r} at {self.endpoint}: {exc}") from exc
        except BotoCoreError as exc:
            raise SpotCkptError(f"cannot reach S3 at {self.endpoint} to create bucket {name!r}: {exc}") from exc

    def committed_steps_in_s3(self) -> list[int] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, prefix = self.s3_uri[5:].partition("/")
        steps = []
        try:
            pages = self._client(creds=self._server is not None).get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/")
            for page in pages:
                for obj in page.get("Contents", []):
                    m = re.search(r"/step-(\d{12})/manifest\.json$", obj["Key"])
                    if m:
                        steps.append(int(m.group(1)))
        except (BotoCoreError, ClientError):
            return None
        return sorted(steps)

    # -- one instance ------------------------------------------------------------------------
    def _deadline_passed(self) -> bool:
        return self.max_wait is not None and time.time() - self.job_start >= self.max_wait

    def _plan_delay(self, n: int) -> float | None:
        """Seconds after first progress at which instance ``n`` is interrupted (None: never)."""
        if self.every is not None:
            if self._stalled_restarts() >= _NO_PROGRESS_RESTARTS:
                if not any("no newer step" in x for x in self.notes):
                    self.notes.append(f"stopped interrupting: {_NO_PROGRESS_RESTARTS} restarts in a row resumed "
                                      "from no newer step (is the trainer saving?)")
                return None
            return self.rng.uniform(*_EVERY_JITTER) * self.every
        assert self.interruptions is not None
        if n <= self.interruptions:
            return self.rng.uniform(*_DEMO_DELAY_SECONDS)
        return None

    def _stalled_restarts(self) -> int:
        """Trailing restarts, among the finished instances, that resumed from no newer step."""
        count, prev = 0, None
        for inst in self.instances:
            if inst.ended is None:
                continue
            r = _restored(inst)
            r = -1 if r is None else r
            count = count + 1 if prev is not None and r <= prev else 0
            prev = r
        return count

    def run_instance(self, n: int) -> _Instance:
        inst_dir = self.work / f"instance-{n}"
        local_dir = inst_dir / "checkpoints"
        local_dir.mkdir(parents=True)
        progress = inst_dir / "events.jsonl"
        inst = _Instance(number=n, local_dir=str(local_dir), started=time.time())
        self.instances.append(inst)
        self.status("Starting", f"instance {n}: fresh empty local dir {local_dir}")
        env = dict(self.env, SPOTCKPT_LOCAL_DIR=str(local_dir), SPOTCKPT_S3_URI=self.s3_uri,
                   SPOTCKPT_EVENTS_FILE=str(progress), TRAINING_JOB_NAME=self.job, PYTHONUNBUFFERED="1")
        delay = self._plan_delay(n)
        log_file = open(inst_dir / "output.log", "wb")  # noqa: SIM115 - closed below
        try:
            try:
                self.proc = proc = subprocess.Popen(self.cmd, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                                    start_new_session=True)
            except OSError as exc:
                raise ConfigError(f"cannot start {self.cmd[0]!r}: {exc}; check the command after '--'") from exc
            inst.started = time.time()
            echo = None if self.json_output else sys.stderr
            readers = [_Output(p, log_file, echo, inst, self.lock) for p in (proc.stdout, proc.stderr) if p]
            self.status("Downloading", f"pid {proc.pid}: restoring the newest checkpoint from {self.s3_uri} (if any)")
            stop_reason = self._watch(inst, proc, progress, delay)
            if stop_reason:
                self._stop(inst, proc, stop_reason)
            rc = proc.wait()
            for r in readers:
                r.thread.join()
            self._poll_progress(inst, progress)
            inst.ended = time.time()
            inst.exit_code = rc
            self.proc = None
        finally:
            log_file.close()
        return inst

    def _poll_progress(self, inst: _Instance, progress: Path) -> None:
        p = _read_progress(progress)
        if p is not None and p != inst.last_progress:
            if not inst.progress:
                inst.first_progress_seen_at = time.time()
            inst.progress.append(p)

    def _watch(self, inst: _Instance, proc: subprocess.Popen[bytes], progress: Path, delay: float | None) -> str:
        """Wait for exit, progress, the interruption time or the wait budget; returns a stop reason."""
        while True:
            self._poll_progress(inst, progress)
            if inst.training_at is None and (inst.first_progress is not None or inst.restore_seen_at is not None):
                inst.training_at = time.time()
                src = inst.restore_fields.get("source", "")
                if inst.restored_step is not None and (inst.restored_step > 0 or src not in ("", "none")):
                    what = f"resumed from step {inst.restored_step}" + (f" ({src})" if src else "")
                elif inst.restored_step is not None:
                    what = "no checkpoint yet: starting from step 0"
                elif inst.number == 1:
                    what = "progress reported (nothing to restore: a new job)"
                else:
                    what = "progress reported (no restore metric line seen)"
                self.status("Training", what)
            if proc.poll() is not None:
                return ""
            if self._deadline_passed():
                return "max-wait"
            seen = inst.first_progress_seen_at
            if delay is not None and seen is not None and time.time() >= seen + delay:
                return "interrupt"
            time.sleep(_POLL_SECONDS)

    def _stop(self, inst: _Instance, proc: subprocess.Popen[bytes], reason: str) -> None:
        inst.sigterm_at = time.time()
        at = f"at step {inst.last_progress[0]}" if inst.last_progress else "before any progress"
        if reason == "interrupt":
            inst.interrupted = True
            self.status("Interrupted", f"spot interruption {at}: SIGTERM to the trainer (pid {proc.pid}), "
                        f"SIGKILL to its process group in {self.grace:g} s")
        else:
            self.status("Stopping", f"MaxWaitTimeInSeconds={self.max_wait:g} reached {at}: SIGTERM to the "
                        f"trainer (pid {proc.pid}), SIGKILL to its process group in {self.grace:g} s")
        # Like a container runtime stopping the instance: SIGTERM to the main process (and through
        # a shell to its children), SIGKILL to everything after the grace.
        forward_signal(proc.pid, signal.SIGTERM)
        progress = Path(inst.local_dir).parent / "progress"
        kill_at = inst.sigterm_at + self.grace
        while proc.poll() is None and time.time() < kill_at:
            self._poll_progress(inst, progress)  # a trainer may go on training during the grace
            try:
                proc.wait(timeout=min(_POLL_SECONDS, max(0.001, kill_at - time.time())))
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            inst.killed = True
            _killpg(proc, signal.SIGKILL)
            proc.wait()
        took = time.time() - inst.sigterm_at
        if not self.json_output:
            how = (f"ignored SIGTERM, killed with SIGKILL after {self.grace:g} s" if inst.killed
                   else f"exited with status {proc.returncode} {took:.2f} s after SIGTERM")
            with self.lock:
                self.stream.write(f"{'':36}trainer {how}\n")
                self.stream.flush()
        # Whatever the trainer itself spawned in its group must go too (the "instance" is gone).
        _killpg(proc, signal.SIGKILL)

    # -- the job ---------------------------------------------------------------------------
    def run(self) -> int:
        self.job_start = time.time()
        self.setup_s3()
        self.job_start = time.time()  # the job starts once S3 is there (not part of TrainingTime)
        if not self.json_output:
            self.stream.write(f"job {self.job}: checkpoints in {self.s3_uri} (S3 endpoint "
                              f"{self.endpoint or 'from the AWS configuration'})\n")
        n = 0
        while True:
            n += 1
            inst = self.run_instance(n)
            if inst.sigterm_at is not None and not inst.interrupted:  # max wait
                self.outcome = "MaxWaitTimeExceeded"
                self.status("MaxWaitTimeExceeded", "the job did not finish within the wait budget")
                return EXIT_MAX_WAIT
            if inst.interrupted:
                if self.restart_delay > 0:
                    end = time.time() + self.restart_delay
                    while time.time() < end and not self._deadline_passed():
                        time.sleep(min(_POLL_SECONDS, max(0.0, end - time.time())))
                if self._deadline_passed():
                    self.status("Stopping", f"MaxWaitTimeInSeconds={self.max_wait:g} reached while waiting for capacity")
                    self.outcome = "MaxWaitTimeExceeded"
                    self.status("MaxWaitTimeExceeded", "the job did not finish within the wait budget")
                    return EXIT_MAX_WAIT
                continue
            rc = inst.exit_code if inst.exit_code is not None else 1
            if rc != 0:
                self.outcome = "Failed"
                self.status("Failed", f"trainer exited with status {rc} without being interrupted")
                return rc if rc > 0 else 1
            steps = self.committed_steps_in_s3()
            if steps is None:
                msg = f"could not list {self.s3_uri}"
            elif steps:
                msg = f"{len(steps)} committed step(s) durable in {self.s3_uri}, newest step {steps[-1]}"
            else:
                msg = f"no committed steps found in {self.s3_uri}"
            self.status("Uploading", msg)
            self.outcome = "Completed"
            self.status("Completed", f"trainer exited 0 after {len(self.instances)} instance(s)")
            return 0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _killpg(self.proc, signal.SIGKILL)
            self.proc.wait()
        if self._server is not None:
            self._server.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- summary ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        end = max([i.ended or time.time() for i in self.instances] + [time.time()])
        # Rounded first, so the savings follow from the two reported figures exactly.
        training = round(end - self.job_start, 3)
        billable = round(sum((i.ended or end) - i.started for i in self.instances), 3)
        savings = (1.0 - billable / training) * 100.0 if training > 0 else 0.0
        interruptions = []
        for k, inst in enumerate(self.instances):
            if not inst.interrupted:
                continue
            nxt = self.instances[k + 1] if k + 1 < len(self.instances) else None
            reached = inst.last_progress[0] if inst.last_progress else None
            restored = _restored(nxt) if nxt else None
            item: dict[str, Any] = {
                "instance": inst.number,
                "interrupted_at": _now_iso(inst.sigterm_at or 0.0),
                "killed_after_grace": inst.killed,
                "exit_code": inst.exit_code,
                "last_step_reached": reached,
                "restored_step": restored,
                "lost_steps": None,
                "lost_seconds": None,
                "seconds_to_resume": None,
                "downtime_seconds": None,
            }
            if reached is not None and restored is not None:
                item["lost_steps"] = max(0, reached - restored)
                if restored >= reached:
                    item["lost_seconds"] = 0.0
                else:
                    t_reached = inst.progress[-1][1]
                    # When this instance reached the restored step (first value seen at or past it);
                    # if it started past it, all its training time was lost.
                    t_restored = _time_at_step(inst.progress, restored)
                    if t_restored is None:
                        t_restored = inst.training_at or inst.started
                    item["lost_seconds"] = round(max(0.0, t_reached - t_restored), 3)
            if nxt is not None and nxt.training_at is not None:
                item["seconds_to_resume"] = round(nxt.training_at - nxt.started, 3)
                item["downtime_seconds"] = round(nxt.training_at - (inst.sigterm_at or nxt.started), 3)
            interruptions.append(item)
        last = self.instances[-1] if self.instances else None
        return {
            "job": self.job,
            "outcome": self.outcome,
            "s3_uri": self.s3_uri,
            "command": self.cmd,
            "seed": self.seed,
            "TrainingTimeInSeconds": round(training, 3),
            "BillableTimeInSeconds": round(billable, 3),
            "savings_percent": round(savings, 2),
            "savings_formula": "(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100",
            "instances": len(self.instances),
            "interruptions_planned": self.interruptions,
            "interrupt_every_seconds": self.every,
            "interruptions": interruptions,
            "lost_steps_total": sum(i["lost_steps"] or 0 for i in interruptions),
            "lost_seconds_total": round(sum(i["lost_seconds"] or 0.0 for i in interruptions), 3),
            "final_step": last.last_progress[0] if last and last.last_progress else None,
            "exit_code": last.exit_code if last else None,
            "notes": self.notes,
        }

    def print_summary(self, s: dict[str, Any]) -> None:
        w = self.stream.write
        w("\nSummary\n")
        w(f"  TrainingTimeInSeconds  {s['TrainingTimeInSeconds']:.1f}   (wall time of the whole job)\n")
        w(f"  BillableTimeInSeconds  {s['BillableTimeInSeconds']:.1f}   (time instances ran the trainer)\n")
        w(f"  savings                {s['savings_percent']:.1f} %  = {s['savings_formula']}\n")
        w(f"  instances              {s['instances']}, final step {s['final_step']}, outcome {s['outcome']}\n")
        for i, it in enumerate(s["interruptions"], 1):
            lost = ("?" if it["lost_steps"] is None else f"{it['lost_steps']} step(s)")
            secs = "" if it["lost_seconds"] is None else f", {it['lost_seconds']:.2f} s"
            resume = ("" if it["seconds_to_resume"] is None else
                      f"; resumed {it['seconds_to_resume']:.2f} s after restart "
                      f"({it['downtime_seconds']:.2f} s after the interruption)")
            kill = " [ignored SIGTERM: SIGKILLed]" if it["killed_after_grace"] else ""
            w(f"  interruption {i}: reached step {it['last_step_reached']}, restored step "
              f"{it['restored_step']} -> lost {lost}{secs}{resume}{kill}\n")
        if (s["outcome"] == "Completed" and self.interruptions is not None
                and len(s["interruptions"]) < self.interruptions):
            w(f"  note: {len(s['interruptions'])} of {self.interruptions} interruptions happened; the job "
              "finished first\n")
        for note in s["notes"]:
            w(f"  note: {note}\n")
        self.stream.flush()


def _time_at_step(progress: list[tuple[int, float]], step: int) -> float | None:
    """When ``step`` was reached, interpolated between the polled values around it."""
    if not progress or progress[0][0] > step:
        return None
    prev = progress[0]
    for cur in progress:
        if cur[0] >= step:
            if cur[0] == prev[0]:
                return cur[1]
            return prev[1] + (cur[1] - prev[1]) * (step - prev[0]) / (cur[0] - prev[0])
        prev = cur
    return None


def _restored(inst: _Instance) -> int | None:
    if inst.restored_step is not None:
        return inst.restored_step
    if inst.first_progress is not None:
        return max(0, inst.first_progress[0] - 1)
    return None


def _killpg(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:  # the group leader's pid was reused; fall back to the process
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _resolve_cmd(cmd: list[str]) -> list[str]:
    if not cmd:
        raise ConfigError("nothing to run: give the training command after '--', e.g. "
                          "spotckpt simulate -- python train.py")
    exe = cmd[0]
    if os.sep in exe:
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise ConfigError(f"command not found or not executable: {exe!r}")
    elif shutil.which(exe) is None:
        raise ConfigError(f"command not found on PATH: {exe!r}; check the command after '--'")
    return list(cmd)


def simulate(
    cmd: list[str],
    *,
    interruptions: int | None = None,
    interrupt_every_seconds: float | None = None,
    seed: int = 0,
    grace_seconds: float = 10.0,
    max_wait_seconds: float | None = None,
    json_output: bool = False,
    s3_uri: str | None = None,
    restart_delay_seconds: float = 1.0,
    stream: TextIO = sys.stdout,
) -> int:
    """Run ``cmd`` through a simulated managed-spot lifecycle; returns the exit status.

    See the module docstring for the statuses, the interruption timing and the summary fields.
    ``restart_delay_seconds`` simulates the (unbilled) wait for spot capacity after each
    interruption. Raises :class:`ConfigError` on bad input before anything is started.
    """
    if interruptions is not None and interrupt_every_seconds is not None:
        raise ConfigError("--interruptions and --interrupt-every conflict: give one of them")
    if interruptions is None and interrupt_every_seconds is None:
        interruptions = DEFAULT_INTERRUPTIONS
    if interruptions is not None and (isinstance(interruptions, bool) or interruptions < 0):
        raise ConfigError(f"--interruptions must be >= 0, got {interruptions!r}")
    if interrupt_every_seconds is not None and not interrupt_every_seconds > 0:
        raise ConfigError(f"--interrupt-every must be > 0 seconds, got {interrupt_every_seconds!r}")
    if not grace_seconds > 0:
        raise ConfigError(f"--grace must be > 0 seconds, got {grace_seconds!r}")
    if max_wait_seconds is not None and not max_wait_seconds > 0:
        raise ConfigError(f"--max-wait must be > 0 seconds, got {max_wait_seconds!r}")
    if not restart_delay_seconds >= 0:
        raise ConfigError(f"--restart-delay must be >= 0 seconds, got {restart_delay_seconds!r}")
    cmd = _resolve_cmd(cmd)
    sim = _Simulation(cmd, interruptions=interruptions, every=interrupt_every_seconds, seed=seed,
                      grace=grace_seconds, max_wait=max_wait_seconds, json_output=json_output,
                      s3_uri=s3_uri, restart_delay=restart_delay_seconds, stream=stream)
    # If the simulator itself is terminated, unwind so the trainer's group and the S3 server go too.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        rc = sim.run()
        summary = sim.summary()
        if json_output:
            doc = {"events": sim.events, **summary}
            stream.write(json.dumps(doc, indent=2) + "\n")
            stream.flush()
        else:
            sim.print_summary(summary)
        return rc
    finally:
        sim.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``simulate``'s options to ``parser`` (the CLI's subcommand parser)."""
    parser.add_argument("--interruptions", type=int, default=None, metavar="N",
                        help=f"interrupt the first N instances (default {DEFAULT_INTERRUPTIONS}), each at a "
                             "random moment 0.5-2 s after it first reports progress")
    parser.add_argument("--interrupt-every", type=float, default=None, metavar="S", dest="interrupt_every",
                        help="interrupt every instance about every S seconds of training (U(0.5, 1.5) * S)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the interruption times (default 0)")
    parser.add_argument("--grace", type=float, default=10.0, metavar="S",
                        help="seconds between SIGTERM and SIGKILL (default 10; SageMaker uses 120)")
    parser.add_argument("--max-wait", type=float, default=None, metavar="S", dest="max_wait",
                        help="MaxWaitTimeInSeconds: stop the job (MaxWaitTimeExceeded, exit 3) after S seconds")
    parser.add_argument("--restart-delay", type=float, default=1.0, metavar="S", dest="restart_delay",
                        help="simulated, unbilled wait for spot capacity before each restart (default 1)")
    parser.add_argument("--s3", default=None, metavar="S3_URI", dest="s3",
                        help="use this s3://bucket/prefix (endpoint from the AWS configuration) instead "
                             "of the embedded S3 server")
    parser.add_argument("--json", action="store_true", dest="json", help="print one JSON document instead")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the training command")


def main_from_args(args: argparse.Namespace) -> int:
    """Run ``simulate`` from the namespace ``add_arguments`` filled in."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return simulate(cmd, interruptions=args.interruptions, interrupt_every_seconds=args.interrupt_every,
                    seed=args.seed, grace_seconds=args.grace, max_wait_seconds=args.max_wait,
                    json_output=args.json, s3_uri=args.s3, restart_delay_seconds=args.restart_delay)


def _main(argv: list[str] | None = None) -> int:  # python -m spotckpt.simulate, until the CLI wires it
    parser = argparse.ArgumentParser(prog="spotckpt simulate", description=__doc__.split("\n", 1)[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main_from_args(args)
    except ConfigError as exc:
        print(f"spotckpt simulate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main())
