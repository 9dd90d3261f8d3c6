"""Decisions as small objects: when to save, and which committed steps to keep.

Save policies answer one question with one method, ``should_save(ctx)``, and extra inputs
arrive in one keyword-only context, so a new signal never changes every signature::

    AnySavePolicy([EveryNSteps(500), EveryNSeconds(600.0)]).should_save(
        SaveContext(step=1500, seconds_since_last_save=12.0, last_saved_step=1000))

:class:`AutoInterval` (``every_steps="auto"``) chooses the interval itself, from measured costs
and the interruption rates (:mod:`spotckpt.autopilot`).

Preemption is not a policy: a preemption always saves (``CheckpointManager.maybe_save``).

Retention policies say which steps survive: :class:`KeepLast` (``keep_last=N``) and
:class:`KeepAll`. The same object decides locally (``LocalStore.prune``) and in S3 (the
uploader's retention, and which local steps are not worth uploading because retention would
delete them at once), so the two never disagree.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spotckpt.autopilot import ENV_VAR, Autopilot, Plan, parse_rates, plan_interval, user_rates
from spotckpt.errors import ConfigError
from spotckpt.events import AutopilotEvent

log = logging.getLogger("spotckpt.autopilot")  # the autopilot's one line per choice keeps its logger name

__all__ = [
    "SaveContext",
    "SavePolicy",
    "EveryNSteps",
    "EveryNSeconds",
    "AnySavePolicy",
    "AutoInterval",
    "save_policy_from",
    "RetentionPolicy",
    "KeepLast",
    "KeepAll",
    "retention_from",
    "doomed",
]


@dataclass(frozen=True, kw_only=True)
class SaveContext:
    """What a save policy may look at. ``last_saved_step`` is None before the first save or
    restore; ``seconds_since_last_save`` counts from then (or from the manager's creation)."""

    step: int
    seconds_since_last_save: float
    last_saved_step: int | None = None


@runtime_checkable
class SavePolicy(Protocol):
    def should_save(self, ctx: SaveContext) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    """Save when ``step`` is a multiple of ``n``."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"every_steps must be a positive int, \"auto\" (the autopilot chooses the interval) "
                              f"or None, got {self.n!r}")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0


@dataclass(frozen=True)
class EveryNSeconds:
    """Save when at least ``seconds`` passed since the last save (or restore, or start)."""

    seconds: float

    def __post_init__(self) -> None:
        if isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float)) or not self.seconds > 0:
            raise ConfigError(f"every_seconds must be > 0 or None, got {self.seconds!r}")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.seconds_since_last_save >= self.seconds


@dataclass(frozen=True)
class AnySavePolicy:
    """Save when any of ``policies`` says so (none: never, except on preemption)."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, policies: Iterable[SavePolicy]) -> None:
        object.__setattr__(self, "policies", tuple(policies))

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)


def save_policy_from(every_steps: int | None, every_seconds: float | None) -> AnySavePolicy:
    """The policy of the manager's ``every_steps`` / ``every_seconds`` arguments (validated)."""
    parts: list[SavePolicy] = []
    if every_steps is not None:
        parts.append(EveryNSteps(every_steps))
    if every_seconds is not None:
        parts.append(EveryNSeconds(every_seconds))
    return AnySavePolicy(parts)


@runtime_checkable
class RetentionPolicy(Protocol):
    def kept(self, steps: Collection[int]) -> set[int]:
        """The steps of ``steps`` that retention keeps (the others may be deleted)."""
        ...


@dataclass(frozen=True)
class KeepAll:
    """Never delete a committed step."""

    def kept(self, steps: Collection[int]) -> set[int]:
        return set(steps)


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest ``n`` steps."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"keep_last must be a positive int or None (keep all), got {self.n!r}")

    def kept(self, steps: Collection[int]) -> set[int]:
        return set(sorted(steps, reverse=True)[: self.n])


def retention_from(keep_last: int | None) -> RetentionPolicy:
    """The policy of a ``keep_last`` argument (validated): None keeps every step."""
    return KeepAll() if keep_last is None else KeepLast(keep_last)


def doomed(policy: RetentionPolicy, steps: Sequence[int], *, protect: Iterable[int | None] = ()) -> list[int]:
    """The steps of ``steps`` to delete, ascending: those ``policy`` does not keep, minus
    ``protect`` (e.g. the newest valid step, or the one being saved)."""
    keep = policy.kept(steps) | {p for p in protect if p is not None}
    return sorted(s for s in steps if s not in keep)


# -- the autopilot's policy ---------------------------------------------------------------------------
class AutoInterval:
    """Save policy: the interval from measured costs and the effective failure rate (see
    :mod:`spotckpt.autopilot`). ``CheckpointManager(every_steps="auto")`` or
    ``save_policy=AutoInterval(...)``.

    ``interruptions_per_hour`` (per instance) or ``frequency_bucket`` (AWS Spot Advisor's, e.g.
    ``"5-10%"``), ``hard_fraction`` (share without notice, default 0.05) and ``instances``: the
    rates; without them ``$SPOTCKPT_INTERRUPTIONS``, else the job's own history. The interval is
    clamped to ``[max(min_interval_seconds, 1.5 x save-to-durable), max_interval_seconds]``, and
    when it is Young/Daly's (not a bound) counted in steps once the step time is known (taken in
    each interval's second half, away from the previous save's background work), with a
    wall-clock ceiling of twice the interval.
    The first save of a run with no recorded costs comes after ``probe_steps`` steps, to measure them.
    ``notice_aware=False`` plans from the total interruption rate (the classical Young/Daly that
    ignores notice; a baseline for benchmarks). The choice is logged (INFO, one line) and
    published as ``event=autopilot`` whenever it moves by more than 10 %.
    """

    def __init__(self, *, interruptions_per_hour: float | None = None, frequency_bucket: str | None = None,
                 hard_fraction: float | None = None, instances: int | None = None,
                 min_interval_seconds: float = 0.0, max_interval_seconds: float = 3600.0, probe_steps: int = 10,
                 notice_aware: bool = True) -> None:
        if not 0 <= min_interval_seconds <= max_interval_seconds or not max_interval_seconds > 0:
            raise ConfigError(f"AutoInterval: need 0 <= min_interval_seconds <= max_interval_seconds, > 0; got "
                              f"{min_interval_seconds!r}, {max_interval_seconds!r}")
        if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 1:
            raise ConfigError(f"AutoInterval: probe_steps must be an int >= 1, got {probe_steps!r}")
        self.rates = user_rates(per_hour=interruptions_per_hour, bucket=frequency_bucket,
                                hard_fraction=hard_fraction, instances=instances)
        if self.rates is None:
            self.rates = parse_rates(os.environ.get(ENV_VAR))
        self.min_s = float(min_interval_seconds)
        self.max_s = float(max_interval_seconds)
        self.probe_steps = probe_steps
        self.notice_aware = notice_aware
        self.interval_s: float | None = None  # None until the costs are known
        # The plan counted in steps of undisturbed training (None until a step time is known: count
        # seconds); a save is also due once ``_cap_s`` seconds passed (steps turned slow).
        self.interval_steps: int | None = None
        self._cap_s = 0.0
        self._half_at = -1  # steps into an interval where its second half starts (the step time is taken there)
        self._half: tuple[float, int] | None = None  # (seconds since the last save, step) at that point
        self.plan: Plan | None = None
        self._pilot: Autopilot | None = None
        self._started = False
        self._start_step = 0  # the step this run started from (restored, or before the first call)
        self._timed: int | None = None

    def bind(self, pilot: Autopilot) -> None:
        """Called by the manager: measure through ``pilot``, re-plan on its updates."""
        self._pilot = pilot
        pilot.on_update(self.replan)

    def should_save(self, ctx: SaveContext) -> bool:
        n = self.interval_steps
        if n is not None and ctx.last_saved_step is not None:
            done = ctx.step - ctx.last_saved_step
            if done < n:
                if done == self._half_at:
                    self._half = (ctx.seconds_since_last_save, ctx.step)
                if ctx.seconds_since_last_save < self._cap_s:
                    return False
            self._note_step_time(ctx)
            return True
        iv = self.interval_s
        if iv is not None:
            if ctx.seconds_since_last_save < iv:
                return False
            self._note_step_time(ctx)
            return True
        if not self._started:
            self._started = True
            self._start_step = ctx.last_saved_step if ctx.last_saved_step is not None else ctx.step - 1
        if ctx.last_saved_step is not None and ctx.last_saved_step != self._start_step:  # probed; no plan yet
            return ctx.seconds_since_last_save >= self.max_s
        return ctx.step - self._start_step >= self.probe_steps

    def _note_step_time(self, ctx: SaveContext) -> None:
        """The step time, from the second half of the interval that ends here when it was seen:
        the steps right after a save run slower while it persists and uploads in the background
        (on a busy machine), and that slowdown is not what a failure throws away per step."""
        last, half = ctx.last_saved_step, self._half
        self._half = None
        if self._pilot is None or last is None or last == self._timed or ctx.step <= last:
            return
        self._timed = last
        if half is not None and last < half[1] < ctx.step:
            self._pilot.note_step_time((ctx.seconds_since_last_save - half[0]) / (ctx.step - half[1]))
        else:
            self._pilot.note_step_time(ctx.seconds_since_last_save / (ctx.step - last))

    def current_rates(self) -> tuple[float, float, str]:
        """(per second: failures without notice, noticed interruptions, where the rates come from)."""
        pilot = self._pilot
        if self.rates is not None:
            lam = self.rates.per_second
            return lam * self.rates.hard_fraction, lam * (1 - self.rates.hard_fraction), self.rates.source
        if pilot is None:
            return 0.0, 0.0, "none"
        now = time.time()
        unsaved, saved = pilot.history.rates(now)
        seen = sum(pilot.history.counts(now)[:2])
        if not seen:  # a new job: the prior alone
            return unsaved, saved, (f"the prior (no interruption recorded yet: about one a day; tell it the rate with "
                                    f"{ENV_VAR}=per_hour=R or AutoInterval(interruptions_per_hour=R))")
        return unsaved, saved, f"history ({seen} interruption{'s' if seen > 1 else ''} recorded)"

    def replan(self, step: int | None = None) -> Plan | None:
        """Plan from the current measurements (the manager's events call this after each save)."""
        pilot = self._pilot
        if pilot is None:
            return None
        c = pilot.costs()
        b = pilot.budget
        cost = c.stall_mean_s
        if cost is None or c.to_durable_s is None or b is None:
            return None
        hard, notice, source = self.current_rates()
        if self.notice_aware:
            p = plan_interval(cost_s=cost, to_durable_s=c.to_durable_s, hard_per_s=hard, notice_per_s=notice,
                              fits=b.fits, fits_busy=b.fits_busy, min_s=self.min_s, max_s=self.max_s)
        else:
            p = plan_interval(cost_s=cost, to_durable_s=c.to_durable_s, hard_per_s=hard + notice,
                              notice_per_s=0.0, fits=True, fits_busy=True, min_s=self.min_s, max_s=self.max_s)
        old, old_steps = self.interval_s, self.interval_steps
        # Daly's optimum trades stalls against lost work: counted in steps. A bound (the pipeline's
        # 1.5 x time to durable, min, max) is a wall-clock limit: counted in seconds.
        about = max(1, int(round(p.interval_s / c.step_s))) if c.step_s else 0
        steps = about if p.why.startswith("daly") else 0
        self.plan = p
        self.interval_s = p.interval_s
        self._cap_s = 2 * p.interval_s  # steps that turned slow: save by the clock after twice the plan
        self._half_at = steps // 2 if steps >= 2 else -1
        self.interval_steps = steps or None
        if old is None or abs(p.interval_s - old) > 0.1 * old or (old_steps or 0) != steps and (
                not old_steps or abs(steps - old_steps) > 0.1 * old_steps):
            if steps:
                counted = f"every {steps} steps at {c.step_s:.4g} s/step"
            elif not p.why.startswith("daly"):
                counted = f"counted in seconds (a {p.why} bound)" + (
                    f", about {about} steps at {c.step_s:.4g} s/step" if about else "")
            else:
                counted = "counted in seconds until the step time is measured"
            log.info("spotckpt: autopilot%s: %s; rates from %s; %s", "" if self.notice_aware else " (ignoring notice)",
                     p.text, source, counted)
            pilot.events.emit(AutopilotEvent(step=step, interval_s=p.interval_s, steps=about,
                                             rate_per_h=p.rate_eff_per_s * 3600, cost_s=p.cost_s, why=p.why))
        return p
