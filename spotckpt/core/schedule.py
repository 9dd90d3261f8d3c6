"""When to save: the save policy, and with several ranks the agreement on one step.

One process: the policy (``every_steps``, ``every_seconds``, a custom one) is asked at every
``maybe_save()``. Several ranks: step-count policies are the same on every rank, so every rank
saves at those steps without talking; anything else -- a preemption noticed on one rank, rank
0's clock, a custom policy evaluated on rank 0 -- becomes a request on the
:class:`spotckpt.ranks.dist.RequestChannel`, and every rank saves at the step they agree on.
Per step, without a request: one local read, no collective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spotckpt.policy import AutoInterval
from spotckpt.errors import ConfigError
from spotckpt.core.preemption import PreemptionWatcher
from spotckpt.policy import EveryNSeconds, EveryNSteps, SaveContext, SavePolicy, save_policy_from
from spotckpt.ranks.dist import Request, SaveAgreement

__all__ = ["SaveSchedule", "FINAL", "POLICY"]

log = logging.getLogger(__name__)

#: What :meth:`SaveSchedule.due_ranks` asks for: the preemption save, or a policy save.
FINAL, POLICY = "final", "policy"


class SaveSchedule:
    """The manager's answer to "save at this step?" (see the module docstring)."""

    def __init__(self, watcher: PreemptionWatcher, *, every_steps: int | str | None, every_seconds: float | None,
                 save_policy: SavePolicy | None, clock: Callable[[], float]) -> None:
        if isinstance(every_steps, str) and every_steps.strip().lower() == "auto":  # the autopilot (spotckpt.autopilot)
            if save_policy is not None or every_seconds is not None:
                raise ConfigError("every_steps='auto' chooses the interval itself; drop every_seconds/save_policy")
            save_policy, every_steps = AutoInterval(), None
        self.custom = save_policy is not None
        # several ranks: step counts need no talking; rank 0's clock (or a custom policy) does
        self._every_steps = None if save_policy is not None or every_steps is None else EveryNSteps(every_steps)
        self._every_seconds = None if save_policy is not None or every_seconds is None else EveryNSeconds(every_seconds)
        self.policy: SavePolicy = save_policy if save_policy is not None else save_policy_from(every_steps, every_seconds)
        self.watcher = watcher
        self.agreement: SaveAgreement | None = None  # several ranks: set by the manager
        self.rank = 0
        self.pipe: Any = None  # the manager's CommitPipeline: the last saved step and when
        self._clock = clock

    def context(self, step: int) -> SaveContext:
        pipe = self.pipe
        return SaveContext(step=step, seconds_since_last_save=self._clock() - pipe.last_save_time,
                           last_saved_step=pipe.last_saved_step)

    def due_ranks(self, step: int) -> tuple[str, str] | None:
        """Several ranks, every step: (FINAL, reason), (POLICY, reason) or None."""
        assert self.agreement is not None
        ask = None
        last_step = self.pipe.last_saved_step
        if self.watcher.requested:
            ask = ("preempt", self.watcher.reason or "requested")
        elif self.rank == 0 and step != last_step and self._rank0_policy_due(step):
            ask = ("policy", f"rank 0's policy at step {step}")
        req = self.agreement.due(step, ask)
        if req is not None:
            return (FINAL if req.kind == "preempt" else POLICY), req.reason
        if self._every_steps is not None and step != last_step and self._every_steps.should_save(self.context(step)):
            return POLICY, f"every {self._every_steps.n} steps"
        return None

    def _rank0_policy_due(self, step: int) -> bool:
        """Rank 0: the part of the policy that is not a plain step count (its clock, or a
        custom policy) says save."""
        if self.custom:
            return self.policy.should_save(self.context(step))
        return self._every_seconds is not None and self._every_seconds.should_save(self.context(step))

    def preemption_due(self, step: int) -> bool:
        """See :meth:`spotckpt.CheckpointManager.preemption_due`."""
        if self.agreement is None:
            return self.watcher.requested
        ask = ("preempt", self.watcher.reason or "requested") if self.watcher.requested else None
        req: Request | None = self.agreement.due(step, ask)
        if req is None:
            return False
        if req.kind != "preempt":
            log.info("spotckpt: step %d: %s asks for a save; the framework decides when to save here", step, req.reason)
            return False
        if not self.watcher.requested:
            self.watcher.request(f"rank {req.by_rank}: {req.reason}")
        return True
