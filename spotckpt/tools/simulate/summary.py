"""What a simulated job recorded, and the summary computed from it -- pure functions of plain data.

Times are seconds on the simulator's monotonic clock, counted from the job's start (the first
``Starting``); ``JobRecord.wall_start`` (Unix seconds) only turns them into readable timestamps.
The trainer's event times (its wall clock) are mapped onto that timeline when they are recorded.

The summary, in SageMaker's terms, with the definitions used in a simulation:

- ``TrainingTimeInSeconds``: the whole job, first ``Starting`` to the end, including the simulated
  waits for spot capacity between an interruption and the next ``Starting``.
- ``instance_seconds``: the time instances actually ran CMD (sum of process start to exit).
- ``BillableTimeInSeconds``: ``instance_seconds * spot_price_ratio``. On SageMaker the billable
  time of a spot job reflects the spot discount; the ratio (spot price / on-demand price, 0.3 by
  default, i.e. 70 % off) is an assumption, printed next to the figure. With 1.0 the savings show
  only the unbilled waits.
- savings: ``(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100``, SageMaker's formula.
- per interruption: the step the instance had reported when SIGTERM was sent, the last step it
  reached (it may go on during the grace), how long it ran, the step the next instance restored
  (its ``restore`` event, else its first ``progress`` step - 1); progress lost in steps
  (``reached - restored``) and in seconds (the interrupted instance's training time from the
  restored step to the last one it reached); whether SIGKILL was needed; ``seconds_to_resume``
  (``Starting`` to ``Training`` of the next instance) and ``downtime_seconds`` (``Interrupted``
  to ``Training``).
- ``sigterm_outcome`` per interruption: ``exited``; ``handled-in-s3`` (killed after the grace,
  but it had handled SIGTERM -- its ``preempted`` event -- and its step was in S3 -- ``durable_s3``);
  ``handled`` (handled, step not in S3 yet); ``ignored`` (killed, no sign of handling it);
  ``no-notice`` (``--hard-kill-fraction``: SIGKILL without SIGTERM, a host lost).
- ``notice`` per interruption: whether SIGTERM came first; ``grace_budget_fits`` /
  ``grace_budget_fits_busy``: what the trainer's newest ``grace_budget`` event before the
  interruption said (None: it published none).
- ``wasted_seconds``: ``checkpoint_stalls`` (the stalls of every save made before an
  interruption, from the ``save`` events), ``lost_work`` (``lost_seconds_total``) and
  ``restart_restore`` (the ``seconds_to_resume`` of every restart: process start, imports,
  restore), and their ``total``. Not counted: the grace (the instance is going anyway) and the
  wait for capacity (unbilled, and no checkpoint policy changes it). A stall inside lost work
  is counted in both.
- ``grace_budget_unfit_elapsed_seconds``: when a ``grace_budget`` event first said a final
  save does not fit (the trainer warned then), on the job's timeline; None when none did.
- a ``Failed`` job gets no savings figure (``None``) and carries the tail of the trainer's output
  (``stderr_tail``: its last lines, stdout and stderr together -- one pipe, in the order written).
- ``final_step``: the last step the final instance reported (progress or save event), else the
  step it restored (a trainer restored at its last step reports no progress).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = ["InstanceRecord", "JobRecord", "summary", "format_summary", "iso_time", "SAVINGS_FORMULA"]

SAVINGS_FORMULA = "(1 - BillableTimeInSeconds / TrainingTimeInSeconds) * 100"


def iso_time(unix: float) -> str:
    """``2024-01-02T03:04:05.678Z``."""
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True, kw_only=True)
class InstanceRecord:
    """One (re)start of CMD. ``progress`` and ``saves`` are ``(step, t)`` pairs in the order seen."""

    number: int
    started_s: float
    ended_s: float | None = None
    training_s: float | None = None  # the ``Training`` status: first restore or progress event seen
    sigterm_s: float | None = None  # SIGTERM sent (an interruption, or the wait budget ran out)
    interrupted: bool = False  # a spot interruption (not the wait budget)
    killed: bool = False  # still running after the grace: SIGKILLed
    exit_code: int | None = None
    restored_step: int | None = None  # from its restore event; None when it emitted none
    restore_source: str | None = None
    step_at_sigterm: int | None = None  # the newest progress step seen when SIGTERM was sent
    progress: tuple[tuple[int, float], ...] = ()
    saves: tuple[tuple[int, float], ...] = ()
    preempted_step: int | None = None  # its ``preempted`` event: it handled SIGTERM (-1: no step given)
    newest_s3_step: int | None = None  # the newest step its ``durable_s3`` events reported
    durable_local: tuple[tuple[int, float], ...] = ()  # (step, t): committed locally (its events)
    durable_s3: tuple[tuple[int, float], ...] = ()  # (step, t): committed in S3 (its events)
    notice: bool = True  # False: killed without SIGTERM (a host lost)
    stall_s: float = 0.0  # the stalls of its saves before the interruption
    grace_fits: bool | None = None  # its newest grace_budget event before the interruption
    grace_fits_busy: bool | None = None
    grace_unfit_s: float | None = None  # its first grace_budget event that said "does not fit"

    @property
    def sigterm_outcome(self) -> str:
        """What the instance did with SIGTERM: ``exited``; ``handled-in-s3`` (it handled the
        signal, its step reached S3, and it was killed before it exited); ``handled`` (handled,
        killed before its step was in S3); ``ignored`` (killed, no sign it handled the signal);
        ``no-notice`` (SIGKILL without SIGTERM)."""
        if not self.notice:
            return "no-notice"
        if not self.killed:
            return "exited"
        if self.preempted_step is None:
            return "ignored"
        if self.newest_s3_step is not None and self.newest_s3_step >= max(self.preempted_step, 0):
            return "handled-in-s3"
        return "handled"

    @property
    def resumed_from(self) -> int | None:
        """The step this instance started from: its restore event, else its first progress - 1."""
        if self.restored_step is not None:
            return self.restored_step
        if self.progress:
            return max(0, self.progress[0][0] - 1)
        return None

    @property
    def last_step(self) -> int | None:
        """The newest step it reported (progress or save), else the step it restored."""
        steps = [s for s, _ in self.progress] + [s for s, _ in self.saves]
        if steps:
            return max(steps)
        return self.restored_step


@dataclass(frozen=True, kw_only=True)
class JobRecord:
    job: str
    command: tuple[str, ...]
    s3_uri: str
    seed: int
    wall_start: float
    end_s: float
    outcome: str
    spot_price_ratio: float
    instances: tuple[InstanceRecord, ...]
    interruptions_planned: int | None = None
    interrupt_every_seconds: float | None = None
    interrupt_every_steps: int | None = None
    hard_kill_fraction: float = 0.0
    total_steps: int | None = None
    notes: tuple[str, ...] = field(default=())
    stderr_tail: tuple[str, ...] = field(default=())  # the failed final instance's last output lines
    embedded_s3: bool = False  # moto embedded: stopped, with its data, when simulate exits


def _time_at_step(progress: tuple[tuple[int, float], ...], step: int) -> float | None:
    """When ``step`` was reached, interpolated between the reported values around it."""
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


def _interruption(job: JobRecord, inst: InstanceRecord, nxt: InstanceRecord | None,
                  final_step: int | None) -> dict[str, Any]:
    reached = inst.last_step
    restored = nxt.resumed_from if nxt is not None else None
    sigterm = inst.sigterm_s if inst.sigterm_s is not None else inst.started_s
    item: dict[str, Any] = {
        "instance": inst.number,
        "interrupted_at": iso_time(job.wall_start + sigterm),
        "elapsed_seconds": round(sigterm, 3),
        "step_at_interruption": inst.step_at_sigterm,
        "during_training": (None if inst.step_at_sigterm is None or final_step is None
                            else inst.step_at_sigterm < final_step),
        "killed_after_grace": inst.killed,
        "sigterm_outcome": inst.sigterm_outcome,
        "step_in_s3": inst.newest_s3_step,
        "exit_code": inst.exit_code,
        "ran_seconds": None if inst.ended_s is None else round(inst.ended_s - inst.started_s, 3),
        "last_step_reached": reached,
        "restored_step": restored,
        "lost_steps": None,
        "lost_seconds": None,
        "seconds_to_resume": None,
        "downtime_seconds": None,
        "notice": inst.notice,
        "grace_budget_fits": inst.grace_fits,
        "grace_budget_fits_busy": inst.grace_fits_busy,
    }
    if reached is not None and restored is not None:
        item["lost_steps"] = max(0, reached - restored)
        if restored >= reached or not inst.progress:
            item["lost_seconds"] = 0.0
        else:
            t_reached = max(t for _, t in inst.progress)
            # When this instance reached the restored step; if it started past it (resumed from
            # a newer step than the next one restored), all its training time was lost.
            t_restored = _time_at_step(inst.progress, restored)
            if t_restored is None:
                t_restored = inst.training_s if inst.training_s is not None else inst.started_s
            item["lost_seconds"] = round(max(0.0, t_reached - t_restored), 3)
    if nxt is not None and nxt.training_s is not None:
        item["seconds_to_resume"] = round(nxt.training_s - nxt.started_s, 3)
        item["downtime_seconds"] = round(nxt.training_s - sigterm, 3)
    return item


def summary(job: JobRecord) -> dict[str, Any]:
    """The summary of ``job`` (see the module docstring for every figure); a JSON-ready dict."""
    end = job.end_s
    instances = job.instances
    # Rounded first, so the savings follow from the two reported figures exactly.
    training = round(end, 3)
    instance_seconds = round(sum((i.ended_s if i.ended_s is not None else end) - i.started_s for i in instances), 3)
    billable = round(instance_seconds * job.spot_price_ratio, 3)
    savings = (1.0 - billable / training) * 100.0 if training > 0 else 0.0
    wait_only = (1.0 - instance_seconds / training) * 100.0 if training > 0 else 0.0
    last = instances[-1] if instances else None
    final_step = last.last_step if last is not None else None
    interruptions = [
        _interruption(job, inst, instances[k + 1] if k + 1 < len(instances) else None, final_step)
        for k, inst in enumerate(instances) if inst.interrupted
    ]
    notes = list(job.notes)
    failed = job.outcome == "Failed"
    if job.embedded_s3:
        notes.append("the embedded S3 server stops when simulate exits; its data (the checkpoints in "
                     f"{job.s3_uri}) goes with it -- pass --s3 to keep them")
    stalls = round(sum(i.stall_s for i in instances), 3)
    lost = round(sum(i["lost_seconds"] or 0.0 for i in interruptions), 3)
    restart = round(sum(i["seconds_to_resume"] or 0.0 for i in interruptions), 3)
    unfit = [i.grace_unfit_s for i in instances if i.grace_unfit_s is not None]
    planned = job.interruptions_planned
    if job.outcome == "Completed" and planned is not None and len(interruptions) < planned:
        notes.append(f"{len(interruptions)} of {planned} interruptions happened: the job finished first")
    return {
        "job": job.job,
        "outcome": job.outcome,
        "s3_uri": job.s3_uri,
        "command": list(job.command),
        "seed": job.seed,
        "TrainingTimeInSeconds": training,
        "BillableTimeInSeconds": billable,
        "savings_percent": None if failed else round(savings, 2),
        "savings_formula": SAVINGS_FORMULA,
        "spot_price_ratio": job.spot_price_ratio,
        "savings_assumption": f"spot price = {job.spot_price_ratio:g} x on-demand price "
                              f"({(1 - job.spot_price_ratio) * 100:.0f} % off); billable = instance seconds x "
                              f"{job.spot_price_ratio:g}",
        "instance_seconds": instance_seconds,
        "unbilled_wait_seconds": round(training - instance_seconds, 3),
        "savings_from_waits_only_percent": None if failed else round(wait_only, 2),
        "instances": len(instances),
        "interruptions_planned": planned,
        "interrupt_every_seconds": job.interrupt_every_seconds,
        "interrupt_every_steps": job.interrupt_every_steps,
        "total_steps": job.total_steps,
        "interruptions": interruptions,
        "lost_steps_total": sum(i["lost_steps"] or 0 for i in interruptions),
        "lost_seconds_total": round(sum(i["lost_seconds"] or 0.0 for i in interruptions), 3),
        "hard_kill_fraction": job.hard_kill_fraction,
        "interruptions_without_notice": sum(1 for i in interruptions if not i["notice"]),
        "wasted_seconds": {"total": round(stalls + lost + restart, 3), "checkpoint_stalls": stalls,
                           "lost_work": lost, "restart_restore": restart},
        "grace_budget_unfit_elapsed_seconds": round(min(unfit), 3) if unfit else None,
        "final_step": final_step,
        "exit_code": last.exit_code if last is not None else None,
        "stderr_tail": list(job.stderr_tail),
        "notes": notes,
    }


def format_summary(s: dict[str, Any]) -> str:
    """The human-readable summary of a :func:`summary` dict."""
    lines = [
        "",
        "Summary",
        f"  TrainingTimeInSeconds  {s['TrainingTimeInSeconds']:.1f}   (wall time of the whole job, waits included)",
        f"  BillableTimeInSeconds  {s['BillableTimeInSeconds']:.1f}   ({s['instance_seconds']:.1f} s on instances "
        f"x spot price ratio {s['spot_price_ratio']:g})",
    ]
    if s["savings_percent"] is None:
        lines.append("  savings                n/a (the job failed)")
    else:
        lines += [
            f"  savings                {s['savings_percent']:.1f} %  = {s['savings_formula']}",
            f"                         assuming spot price = {s['spot_price_ratio']:g} x on-demand "
            f"(--spot-price-ratio); from the unbilled waits alone: {s['savings_from_waits_only_percent']:.1f} %",
        ]
    lines += [
        f"  instances              {s['instances']}, final step {s['final_step']}, outcome {s['outcome']}",
    ]
    for i, it in enumerate(s["interruptions"], 1):
        lost = "?" if it["lost_steps"] is None else f"{it['lost_steps']} step(s)"
        secs = "" if it["lost_seconds"] is None else f", {it['lost_seconds']:.2f} s"
        resume = ("" if it["seconds_to_resume"] is None else
                  f"; resumed {it['seconds_to_resume']:.2f} s after restart "
                  f"({it['downtime_seconds']:.2f} s after the interruption)")
        kill = {"ignored": " [ignored SIGTERM: SIGKILLed]",
                "handled": " [handled SIGTERM, its step not in S3 yet: SIGKILLed before exiting]",
                "handled-in-s3": f" [handled SIGTERM, step {it['step_in_s3']} in S3, killed before exiting]",
                "no-notice": " [no notice: SIGKILL, no SIGTERM]",
                }.get(it.get("sigterm_outcome", ""), "")
        late = " [after the final step]" if it["during_training"] is False else ""
        lines.append(f"  interruption {i}: at step {it['step_at_interruption']}, reached step "
                     f"{it['last_step_reached']}, restored step {it['restored_step']} -> lost {lost}{secs}"
                     f"{resume}{kill}{late}")
    w = s.get("wasted_seconds")
    if w is not None:
        hard = s.get("interruptions_without_notice", 0)
        lines.append(f"  wasted                 {w['total']:.2f} s = checkpoint stalls {w['checkpoint_stalls']:.2f} s"
                     f" + lost work {w['lost_work']:.2f} s + restart and restore {w['restart_restore']:.2f} s"
                     + (f"  ({hard} of {len(s['interruptions'])} interruptions without notice)" if hard else ""))
    lines += [f"  note: {note}" for note in s["notes"]]
    if s.get("stderr_tail"):
        lines.append(f"  the trainer's output (stdout and stderr), last {len(s['stderr_tail'])} lines:")
        lines += [f"    {ln}" for ln in s["stderr_tail"]]
    return "\n".join(lines) + "\n"
