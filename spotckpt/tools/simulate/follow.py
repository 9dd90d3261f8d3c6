"""Following a trainer through its events file (``$SPOTCKPT_EVENTS_FILE``, JSON lines).

:class:`EventsTail` reads the file incrementally: it keeps a byte offset and parses only whole new
lines (a line still being written waits for the next read). :class:`InstanceTracker` folds the
events of one instance into what the summary needs (restore, progress, saves), with event times
mapped onto the simulator's monotonic timeline. Both are used from one thread only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO

from spotckpt.events import (
    DurableLocalEvent,
    DurableS3Event,
    Event,
    GraceBudgetEvent,
    PreemptedEvent,
    ProgressEvent,
    RestoreEvent,
    SaveEvent,
    parse_event_line,
)
from spotckpt.tools.simulate.summary import InstanceRecord

__all__ = ["EventsTail", "MultiTail", "InstanceTracker"]


class EventsTail:
    """The events appended to ``path`` since the previous :meth:`read` (the file may not exist yet)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: IO[bytes] | None = None
        self._partial = b""

    def read(self) -> list[Event]:
        """Parse the whole lines appended since the last call; lines that are not events are skipped."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
            except FileNotFoundError:
                return []
        data = self._file.read()  # from the offset the previous read left
        if not data:
            return []
        *lines, self._partial = (self._partial + data).split(b"\n")
        events = []
        for line in lines:
            ev = parse_event_line(line)
            if ev is not None:
                events.append(ev)
        return events

    def close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()


class MultiTail:
    """The events of several files (one per simulated host), read together."""

    def __init__(self, paths: list[Path]) -> None:
        self.tails = [EventsTail(p) for p in paths]

    def read(self) -> list[Event]:
        events = [ev for t in self.tails for ev in t.read()]
        events.sort(key=lambda e: e.time)
        return events

    def close(self) -> None:
        for t in self.tails:
            t.close()


class InstanceTracker:
    """What the simulator knows about one running instance; :meth:`record` freezes it.

    ``from_wall`` maps an event's wall-clock time onto the job's monotonic timeline.
    """

    def __init__(self, number: int, *, started_s: float, from_wall: Callable[[float], float]) -> None:
        self.number = number
        self.started_s = started_s
        self._from_wall = from_wall
        self.restored_step: int | None = None
        self.restore_source: str | None = None
        self.progress: list[tuple[int, float]] = []
        self.saves: list[tuple[int, float]] = []
        self.durable_local: list[tuple[int, float]] = []  # (step, t) of its durable_local events
        self.durable_s3: list[tuple[int, float]] = []  # (step, t) of its durable_s3 events
        self.preempted_step: int | None = None  # its ``preempted`` event: it handled the signal
        self.newest_s3_step: int | None = None  # the newest of its ``durable_s3`` events
        self.first_progress_seen_s: float | None = None  # on the simulator's clock, when read
        self.training_s: float | None = None
        self.sigterm_s: float | None = None
        self.step_at_sigterm: int | None = None
        self.interrupted = False
        self.notice = True  # False: killed without SIGTERM (--hard-kill-fraction)
        self.killed = False
        self.stall_s = 0.0  # the stalls of its saves before the interruption
        self.grace_fits: bool | None = None  # its newest grace budget before the interruption
        self.grace_fits_busy: bool | None = None
        self.grace_unfit_s: float | None = None  # when a grace budget first said "does not fit"
        self.ended_s: float | None = None
        self.exit_code: int | None = None

    @property
    def last_progress_step(self) -> int | None:
        return self.progress[-1][0] if self.progress else None

    @property
    def first_progress_step(self) -> int | None:
        return self.progress[0][0] if self.progress else None

    @property
    def restore_seen(self) -> bool:
        return self.restore_source is not None

    def ingest(self, events: list[Event], *, now_s: float) -> bool:
        """Fold ``events`` in; returns whether training advanced (a new progress step)."""
        advanced = False
        for ev in events:
            t = self._from_wall(ev.time)
            if isinstance(ev, RestoreEvent) and not self.restore_seen:
                self.restored_step = ev.step
                self.restore_source = ev.source
            elif isinstance(ev, ProgressEvent) and ev.step is not None:
                if self.progress and ev.step == self.progress[-1][0]:
                    continue
                if not self.progress:
                    self.first_progress_seen_s = now_s
                self.progress.append((ev.step, t))
                advanced = True
            elif isinstance(ev, SaveEvent) and ev.step is not None:
                self.saves.append((ev.step, t))
                if self.sigterm_s is None or t < self.sigterm_s:
                    self.stall_s += ev.stall_s
            elif isinstance(ev, GraceBudgetEvent) and (self.sigterm_s is None or t < self.sigterm_s):
                self.grace_fits, self.grace_fits_busy = ev.fits, ev.fits_busy
                if not ev.fits_busy and self.grace_unfit_s is None:
                    self.grace_unfit_s = t
            elif isinstance(ev, PreemptedEvent) and self.preempted_step is None:
                self.preempted_step = ev.step if ev.step is not None else -1
            elif isinstance(ev, DurableLocalEvent) and ev.step is not None:
                self.durable_local.append((ev.step, t))
            elif isinstance(ev, DurableS3Event) and ev.step is not None:
                self.durable_s3.append((ev.step, t))
                self.newest_s3_step = max(ev.step, self.newest_s3_step if self.newest_s3_step is not None else ev.step)
        return advanced

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            number=self.number, started_s=self.started_s, ended_s=self.ended_s, training_s=self.training_s,
            sigterm_s=self.sigterm_s, interrupted=self.interrupted, killed=self.killed,
            exit_code=self.exit_code, restored_step=self.restored_step, restore_source=self.restore_source,
            step_at_sigterm=self.step_at_sigterm, progress=tuple(self.progress), saves=tuple(self.saves),
            preempted_step=self.preempted_step, newest_s3_step=self.newest_s3_step,
            durable_local=tuple(self.durable_local), durable_s3=tuple(self.durable_s3),
            notice=self.notice, stall_s=self.stall_s, grace_fits=self.grace_fits,
            grace_fits_busy=self.grace_fits_busy, grace_unfit_s=self.grace_unfit_s,
        )
