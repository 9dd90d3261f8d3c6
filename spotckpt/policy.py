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

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from spotckpt.errors import ConfigError

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
            raise ConfigError(f"every_steps must be a positive int or None, got {self.n!r}")

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


from spotckpt.autopilot import AutoInterval  # noqa: E402 - defined there, with the interval math it needs
