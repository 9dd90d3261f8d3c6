"""The lifecycle of one simulated job: instance after instance, with the statuses SageMaker reports.

Runs on the caller's thread. Intervals come from the monotonic clock (:class:`Clock`); the wall
clock is only used to print timestamps and to map the trainer's event times onto the timeline.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from spotckpt.tools.simulate.follow import InstanceTracker, MultiTail
from spotckpt.remote.sidecar import with_torchrun_threads
from spotckpt.tools.simulate.process import HostGroup, TrainerProcess, free_port, host_commands
from spotckpt.tools.simulate.s3env import SimS3
from spotckpt.tools.simulate.schedule import Observation, Scheduler, Trigger
from spotckpt.tools.simulate.summary import InstanceRecord, JobRecord, iso_time

__all__ = ["Clock", "Simulation", "EXIT_MAX_WAIT"]

#: Exit status of ``spotckpt simulate`` when the wait budget ran out (``MaxWaitTimeExceeded``).
EXIT_MAX_WAIT = 3
_POLL_SECONDS = 0.05


class Clock:
    """Seconds since the job started, on the monotonic clock; :meth:`from_wall` maps a wall-clock
    time (an event's ``time``) onto it with the offset taken at the start (a wall-clock step during
    the job shifts those, nothing else)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._mono0 = time.monotonic()
        self.wall_start = time.time()

    def now(self) -> float:
        return time.monotonic() - self._mono0

    def from_wall(self, unix: float) -> float:
        return unix - self.wall_start


class Simulation:
    """State of one simulated job. Call :meth:`run`, then :meth:`record`, and :meth:`close` always."""

    def __init__(self, cmd: list[str], *, scheduler: Scheduler, s3_uri: str | None, grace_s: float,
                 max_wait_s: float | None, restart_delay_s: float, spot_price_ratio: float, seed: int,
                 json_output: bool, stream: TextIO, hosts: int = 1, interrupt_hosts: str = "all") -> None:
        self.cmd = cmd
        self.hosts = hosts
        self.interrupt_hosts = interrupt_hosts
        self._rng = random.Random(f"hosts-{seed}")
        self.scheduler = scheduler
        self.grace_s = grace_s
        self.max_wait_s = max_wait_s
        self.restart_delay_s = restart_delay_s
        self.spot_price_ratio = spot_price_ratio
        self.seed = seed
        self.json_output = json_output
        self.stream = stream
        self.job = f"sim-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.s3 = SimS3(s3_uri, job=self.job)
        self.clock = Clock()
        self.statuses: list[dict[str, Any]] = []
        self.trackers: list[InstanceTracker] = []
        self.outcome = ""
        self.end_s: float | None = None
        self.lock = threading.Lock()  # one writer at a time on the shared streams
        self.work = Path(tempfile.mkdtemp(prefix="spotckpt-sim-"))
        self._proc: TrainerProcess | HostGroup | None = None
        self.stderr_tail: list[str] = []
        self.embedded_s3 = False

    # -- output ----------------------------------------------------------------------------
    def status(self, name: str, message: str = "") -> None:
        t = self.clock.now()
        stamp = iso_time(self.clock.wall_start + t)
        self.statuses.append({"status": name, "time": stamp, "elapsed_seconds": round(t, 3), "message": message})
        self._say(f"{stamp} {t:8.2f}s  {name:<20} {message}".rstrip())

    def _say(self, line: str) -> None:
        if not self.json_output:
            with self.lock:
                self.stream.write(line + "\n")
                self.stream.flush()

    def _deadline_passed(self) -> bool:
        return self.max_wait_s is not None and self.clock.now() >= self.max_wait_s

    # -- the job ---------------------------------------------------------------------------
    def run(self) -> int:
        """The job, to its end; returns the exit status (see the package docstring)."""
        self.s3.start()
        self.clock.reset()  # the job starts once S3 is there (not part of TrainingTime)
        self.embedded_s3 = self.s3.embedded
        if self.embedded_s3:
            where = "the embedded S3 server (moto on 127.0.0.1; stopped, with its data, when simulate ends)"
        elif self.s3.uri_arg:
            where = (f"S3 endpoint {self.s3.endpoint or 'from the AWS configuration'}; /{self.job} is appended "
                     "to --s3 so that every simulation starts from an empty prefix")
        else:
            where = f"S3 endpoint {self.s3.endpoint}"
        self._say(f"job {self.job}: checkpoints in {self.s3.s3_uri} ({where})")
        try:
            return self._run()
        finally:
            self.end_s = self.clock.now()

    def _run(self) -> int:
        n = 0
        while True:
            n += 1
            inst = self._run_instance(n)
            if inst.sigterm_s is not None and not inst.interrupted:  # the wait budget ran out
                return self._max_wait_exceeded()
            if inst.interrupted:
                end = time.monotonic() + self.restart_delay_s
                while time.monotonic() < end and not self._deadline_passed():
                    time.sleep(min(_POLL_SECONDS, max(0.0, end - time.monotonic())))
                if self._deadline_passed():
                    self.status("Stopping", f"MaxWaitTimeInSeconds={self.max_wait_s:g} reached while waiting "
                                "for capacity")
                    return self._max_wait_exceeded()
                continue
            rc = inst.exit_code if inst.exit_code is not None else 1
            if rc != 0:
                self.outcome = "Failed"
                self.status("Failed", f"trainer exited with status {rc} without being interrupted")
                return rc if rc > 0 else 1
            steps = self.s3.committed_steps()
            if steps is None:
                msg = f"could not list {self.s3.s3_uri}"
            elif steps:
                msg = f"{len(steps)} committed step(s) durable in {self.s3.s3_uri}, newest step {steps[-1]}"
            else:
                msg = f"no committed steps found in {self.s3.s3_uri}"
            self.status("Uploading", msg)
            self.outcome = "Completed"
            self.status("Completed", f"trainer exited 0 after {len(self.trackers)} instance(s)")
            return 0

    def _max_wait_exceeded(self) -> int:
        self.outcome = "MaxWaitTimeExceeded"
        self.status("MaxWaitTimeExceeded", "the job did not finish within the wait budget")
        return EXIT_MAX_WAIT

    # -- one instance ------------------------------------------------------------------------
    def _run_instance(self, n: int) -> InstanceTracker:
        inst_dir = self.work / f"instance-{n}"
        host_dirs = [inst_dir] if self.hosts == 1 else [inst_dir / f"host-{h}" for h in range(self.hosts)]
        for d in host_dirs:
            (d / "checkpoints").mkdir(parents=True)
        resumed = [t.record().resumed_from for t in self.trackers]
        inst = InstanceTracker(n, started_s=self.clock.now(), from_wall=self.clock.from_wall)
        self.trackers.append(inst)
        where = ", ".join(str(d / "checkpoints") for d in host_dirs)
        told = self.scheduler.trainer_env() if n == 1 else {}
        self.status("Starting", f"instance {n}: fresh empty local dir{'s' if self.hosts > 1 else ''} {where}"
                    + "".join(f"; the trainer is told {k}={v} (the schedule's rates, for every_steps='auto')"
                              for k, v in told.items()))
        trigger = self.scheduler.plan(n, resumed)
        tail = MultiTail([d / "events.jsonl" for d in host_dirs])
        procs: list[TrainerProcess] = []
        try:
            for d, cmd in zip(host_dirs, host_commands(self.cmd, self.hosts, port=free_port())):
                env = dict(self.s3.env, SPOTCKPT_LOCAL_DIR=str(d / "checkpoints"), SPOTCKPT_S3_URI=self.s3.s3_uri,
                           SPOTCKPT_EVENTS_FILE=str(d / "events.jsonl"), TRAINING_JOB_NAME=self.job,
                           SPOTCKPT_GRACE_SECONDS=f"{self.grace_s:g}", PYTHONUNBUFFERED="1",
                           **self.scheduler.trainer_env())
                env = with_torchrun_threads(cmd, env)
                procs.append(TrainerProcess(cmd, env=env, log_path=d / "output.log",
                                            echo=None if self.json_output else sys.stderr, lock=self.lock))
            proc: TrainerProcess | HostGroup = procs[0] if self.hosts == 1 else HostGroup(procs)
            if isinstance(proc, HostGroup) and self.interrupt_hosts == "one":
                proc.interrupt = [self._rng.randrange(self.hosts)]
            self._proc = proc
            inst.started_s = self.clock.now()
            self.status("Downloading", f"pid {proc.pid}: restoring the newest checkpoint from {self.s3.s3_uri} "
                        "(if any)")
            reason = self._watch(inst, proc, tail, trigger)
            if reason:
                self._stop(inst, proc, tail, reason, notice=trigger.notice if trigger is not None else True)
            rc = proc.wait()
            self.stderr_tail = proc.output_tail()
            self._follow(inst, tail)
            inst.ended_s = self.clock.now()
            inst.exit_code = rc
            self._proc = None
        except BaseException:
            for p in procs:
                if p.poll() is None:
                    p.kill_group()
            raise
        finally:
            tail.close()
        return inst

    def _follow(self, inst: InstanceTracker, tail: MultiTail) -> bool:
        """Read the trainer's new events; note ``Training`` once it restored or progressed.
        Returns whether a new progress step arrived."""
        advanced = inst.ingest(tail.read(), now_s=self.clock.now())
        if inst.training_s is None and (inst.progress or inst.restore_seen):
            inst.training_s = self.clock.now()
            if inst.restore_seen:
                what = f"resumed from step {inst.restored_step} ({inst.restore_source})"
            elif inst.number == 1:
                what = "progress reported (nothing to restore: a new job)"
            else:
                what = f"progress reported at step {inst.first_progress_step} (nothing restored)"
            self.status("Training", what)
        return advanced

    def _watch(self, inst: InstanceTracker, proc: TrainerProcess | HostGroup, tail: MultiTail, trigger: Trigger | None) -> str:
        """Wait for exit, the interruption or the wait budget; returns a stop reason ("" = exited)."""
        while True:
            advanced = self._follow(inst, tail)
            if proc.poll() is not None:
                return ""
            if self._deadline_passed():
                return "max-wait"
            obs = Observation(now_s=self.clock.now(), first_progress_seen_s=inst.first_progress_seen_s,
                              first_step=inst.first_progress_step, last_step=inst.last_progress_step,
                              new_progress=advanced)
            if self.scheduler.fires(trigger, obs):
                return "interrupt"
            time.sleep(_POLL_SECONDS)

    def _stop(self, inst: InstanceTracker, proc: TrainerProcess | HostGroup, tail: MultiTail, reason: str,
              notice: bool = True) -> None:
        inst.sigterm_s = self.clock.now()
        inst.step_at_sigterm = inst.last_progress_step
        at = f"at step {inst.step_at_sigterm}" if inst.progress else "before any progress"
        if reason == "interrupt" and not notice:  # a host lost: every host of the instance goes at once
            inst.interrupted, inst.notice, inst.killed = True, False, True
            self.status("Interrupted", f"host lost without notice {at}: SIGKILL to the trainer's process group "
                        f"(pid {proc.pid}), no SIGTERM")
            proc.kill_group()
            self._follow(inst, tail)
            return
        then = f"SIGTERM to the trainer (pid {proc.pid}), SIGKILL to its process group in {self.grace_s:g} s"
        if reason == "interrupt":
            inst.interrupted = True
            self.status("Interrupted", f"spot interruption {at}: {then}")
        else:
            self.status("Stopping", f"MaxWaitTimeInSeconds={self.max_wait_s:g} reached {at}: {then}")
        if isinstance(proc, HostGroup):
            which = "every host" if len(proc.interrupt) == len(proc.hosts) else f"host {proc.interrupt[0]}"
            self._say(f"{'':36}spot capacity reclaimed: {which} of {len(proc.hosts)}")
        inst.killed = proc.stop(self.grace_s, while_waiting=lambda: self._follow(inst, tail))
        self._follow(inst, tail)
        took = self.clock.now() - inst.sigterm_s
        outcome = inst.record().sigterm_outcome
        how = {
            "exited": f"exited with status {proc.proc.returncode} {took:.2f} s after SIGTERM",
            "handled-in-s3": f"handled SIGTERM, step {inst.newest_s3_step} in S3, killed with SIGKILL before "
                             f"exiting ({self.grace_s:g} s grace)",
            "handled": f"handled SIGTERM but its step was not in S3 when SIGKILL came after {self.grace_s:g} s",
        }.get(outcome, f"ignored SIGTERM, killed with SIGKILL after {self.grace_s:g} s")
        self._say(f"{'':36}trainer {how}")

    # -- results -----------------------------------------------------------------------------
    def record(self) -> JobRecord:
        """Everything recorded, as plain data for :func:`~spotckpt.tools.simulate.summary.summary`."""
        instances: tuple[InstanceRecord, ...] = tuple(t.record() for t in self.trackers)
        return JobRecord(
            job=self.job, command=tuple(self.cmd), s3_uri=self.s3.s3_uri, seed=self.seed,
            wall_start=self.clock.wall_start, end_s=self.end_s if self.end_s is not None else self.clock.now(),
            outcome=self.outcome, spot_price_ratio=self.spot_price_ratio, instances=instances,
            interruptions_planned=self.scheduler.interruptions,
            interrupt_every_seconds=self.scheduler.every_seconds, interrupt_every_steps=self.scheduler.every_steps,
            total_steps=self.scheduler.total_steps,
            hard_kill_fraction=self.scheduler.hard_kill_fraction,
            notes=tuple(self.scheduler.notes),
            stderr_tail=tuple(self.stderr_tail) if self.outcome == "Failed" else (),
            embedded_s3=self.embedded_s3,
        )

    def close(self) -> None:
        """Stop what is still running (the trainer's group, the embedded S3) and remove the work dir."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill_group()
            proc.proc.wait()
        self.s3.close()
        shutil.rmtree(self.work, ignore_errors=True)

