"""When the simulated spot interruptions happen (seeded: ``random.Random(seed)``).

Every interruption lands strictly during training: it fires only on a poll that has just read a
new ``progress`` event of the instance (the trainer is in its loop, not restoring or finishing),
never before the instance's first progress (so every restart has something to resume), and, when
the trainer's final step is known (``total_steps``), never at or past it. A trainer that finishes
before its interruption is due is simply not interrupted (the summary reports fewer).

- ``interruptions=N`` (a demo): the first N instances are each interrupted once.

  * with ``total_steps=T``: interruption k at a step drawn in the k-th of N equal slices of the
    window [10 %, 90 %] of T (so all N fit in the run, in order);
  * without it: a random 0.5-2 s after the instance's first progress (the final step is unknown,
    so a very short run may finish first).

- ``interrupt_every_seconds=S``: every instance, ``U(0.5, 1.5) * S`` seconds after its first
  progress, for as long as the job runs -- stopping after 3 restarts in a row that resumed from no
  newer step (the trainer saves nothing: it would loop forever).
- ``interrupt_every_steps=N``: interruptions at *training steps* drawn once for the seed, the same
  whatever the trainer does: step ``s_k = s_(k-1) + max(2, round(U(0.5, 1.5) * N))`` from
  ``s_0 = 0``; instance k is interrupted once it reports step ``s_k`` (or later: the simulator
  polls), and never at or past ``total_steps``. A trainer that loses work replays steps and meets
  interruption k+1 at the same absolute step as one that lost none, so checkpoint policies run
  with the same seed meet the same interruptions, of the same kinds, at the same steps (a
  time-based schedule gives a policy that wastes more time more interruptions). The same
  give-up rule as above.

``hard_kill_fraction=F``: each interruption is, with probability F, a host lost without notice
(SIGKILL, no SIGTERM: ``Trigger.notice`` False), drawn from a generator of its own
(``random.Random(f"hard-{seed}")``), so the times drawn for a seed do not depend on F.

:meth:`Scheduler.trainer_env` is how the trainer learns the schedule's rates, as a user would
configure them: ``SPOTCKPT_INTERRUPTIONS=per_hour=3600/S,hard_fraction=F`` with
``interrupt_every_seconds`` (one interruption per S seconds of training, on average); with
``interrupt_every_steps=N``, ``per_hour=3600/(N*T)`` for the *nominal* step time ``T``
(``step_seconds``, ``--step-seconds``: the same for every run, so every policy is told the same
rate), and nothing without one; nothing with ``interruptions=N`` (a count, not a rate). See
:mod:`spotckpt.autopilot`.

Used from the simulator's thread only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

__all__ = ["Trigger", "Observation", "Scheduler"]

DEMO_DELAY_SECONDS = (0.5, 2.0)
EVERY_JITTER = (0.5, 1.5)
MIN_STEP_GAP = 2
NO_PROGRESS_RESTARTS = 3
WINDOW = (0.1, 0.9)


@dataclass(frozen=True)
class Trigger:
    """When one instance is interrupted: ``after_seconds`` of training past its first progress,
    or once it reports ``at_step`` (or later)."""

    after_seconds: float | None = None
    at_step: int | None = None
    notice: bool = True  # False: SIGKILL without SIGTERM (a host lost)


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What the simulator knows of the running instance at one poll."""

    now_s: float
    first_progress_seen_s: float | None
    first_step: int | None
    last_step: int | None
    new_progress: bool  # this poll read a new progress step


class Scheduler:
    def __init__(self, *, interruptions: int | None, every_seconds: float | None, seed: int,
                 total_steps: int | None = None, hard_kill_fraction: float = 0.0, every_steps: int | None = None,
                 step_seconds: float | None = None) -> None:
        self.interruptions = interruptions
        self.every_seconds = every_seconds
        self.every_steps = every_steps
        self.step_seconds = step_seconds
        self.total_steps = total_steps
        self.hard_kill_fraction = hard_kill_fraction
        self.rng = random.Random(seed)
        self._hard_rng = random.Random(f"hard-{seed}")
        self.notes: list[str] = []
        self._step_targets = self._draw_step_targets()
        self._every_targets: list[int] = []
        self._gave_up = False
        if every_steps is not None and step_seconds is None:
            self.notes.append("the trainer was told no interruption rate: --interrupt-every-steps needs "
                              "--step-seconds to turn steps into a rate (SPOTCKPT_INTERRUPTIONS)")

    def _draw_step_targets(self) -> list[int]:
        n, total = self.interruptions, self.total_steps
        if not n or total is None or self.every_seconds is not None or self.every_steps is not None:
            return []
        lo = max(1, math.floor(WINDOW[0] * total))
        hi = max(lo + 1, math.floor(WINDOW[1] * total))
        targets = []
        for k in range(n):
            a = lo + (hi - lo) * k // n
            b = max(a, lo + (hi - lo) * (k + 1) // n - 1)
            targets.append(self.rng.randint(a, b))
        return targets

    def step_target(self, k: int) -> int:
        """``interrupt_every_steps``: the absolute step of interruption ``k`` (1-based)."""
        assert self.every_steps is not None
        while len(self._every_targets) < k:
            prev = self._every_targets[-1] if self._every_targets else 0
            gap = round(self.rng.uniform(*EVERY_JITTER) * self.every_steps)
            self._every_targets.append(prev + max(MIN_STEP_GAP, gap))
        return self._every_targets[k - 1]

    def trainer_env(self) -> dict[str, str]:
        """What the trainer is told of the schedule (see the module docstring)."""
        if self.every_seconds is not None:
            every = self.every_seconds
        elif self.every_steps is not None and self.step_seconds is not None:
            every = self.every_steps * self.step_seconds
        else:
            return {}
        return {"SPOTCKPT_INTERRUPTIONS": f"per_hour={3600.0 / every:.6g},"
                                          f"hard_fraction={self.hard_kill_fraction:g}"}

    def plan(self, number: int, resumed_from: list[int | None]) -> Trigger | None:
        """The trigger of instance ``number`` (1-based); ``resumed_from`` lists the step each
        earlier instance started from (None: unknown). None: it is not interrupted."""
        trigger = self._plan(number, resumed_from)
        if trigger is None or not self.hard_kill_fraction:
            return trigger
        return replace(trigger, notice=self._hard_rng.random() >= self.hard_kill_fraction)

    def _plan(self, number: int, resumed_from: list[int | None]) -> Trigger | None:
        if self.every_seconds is not None or self.every_steps is not None:
            if _stalled_restarts(resumed_from) >= NO_PROGRESS_RESTARTS:
                if not self._gave_up:
                    self._gave_up = True
                    self.notes.append(f"stopped interrupting: {NO_PROGRESS_RESTARTS} restarts in a row resumed "
                                      "from no newer step (is the trainer saving?)")
                return None
            if self.every_steps is not None:
                at = self.step_target(number)
                return None if self.total_steps is not None and at >= self.total_steps else Trigger(at_step=at)
            assert self.every_seconds is not None
            return Trigger(after_seconds=self.rng.uniform(*EVERY_JITTER) * self.every_seconds)
        if self.interruptions is None or number > self.interruptions:
            return None
        if self._step_targets:
            return Trigger(at_step=self._step_targets[number - 1])
        return Trigger(after_seconds=self.rng.uniform(*DEMO_DELAY_SECONDS))

    def fires(self, trigger: Trigger | None, obs: Observation) -> bool:
        """Whether to interrupt now."""
        if trigger is None or not obs.new_progress or obs.last_step is None:
            return False
        if self.total_steps is not None and obs.last_step >= self.total_steps:
            return False
        if trigger.at_step is not None:
            # at the target, and past this instance's first step (it trained before it is stopped)
            return obs.last_step >= trigger.at_step and obs.last_step > (obs.first_step or 0)
        assert trigger.after_seconds is not None and obs.first_progress_seen_s is not None
        return obs.now_s >= obs.first_progress_seen_s + trigger.after_seconds


def _stalled_restarts(resumed_from: list[int | None]) -> int:
    """Trailing restarts that resumed from no newer step than the instance before them."""
    count, prev = 0, None
    for r in resumed_from:
        r = -1 if r is None else r
        count = count + 1 if prev is not None and r <= prev else 0
        prev = r
    return count
