"""Typed events of a :class:`~spotckpt.CheckpointManager`, and the bus that hands them to listeners.

Every event is a frozen dataclass; ``name`` is its stable event name and :meth:`Event.fields`
its payload in a stable order (new fields are only ever added at the end)::

    SaveEvent          save()          step, stall_s, bytes, blocking
    DurableLocalEvent  persist thread  step, seconds, bytes          (committed under local_dir)
    DurableS3Event     uploader thread step, seconds, bytes, since_save_s   (manifest in S3)
    RestoreEvent       restore()       step, seconds, source, bytes
    PreemptedEvent     maybe_save()    step, reason                  (final save starts)
    ProgressEvent      maybe_save()    step                          (every call: training advanced)
    GraceBudgetEvent   the thread of the save's last event   step, need_s, grace_s, fits, need_busy_s,
                       fits_busy                    (what a final save would take now: see autopilot)
    AutopilotEvent     the same, or restore()  step, interval_s, steps, rate_per_h, cost_s, why
                       (AutoInterval chose a new interval)

Listeners are plain callables ``listener(event) -> None``, called on the thread that emits the
event (named in the table), so they must be quick and thread-safe. A listener that raises is
logged and otherwise ignored: observing a save can never break it.

Built-in listeners: :class:`spotckpt.core.metrics.MetricsListener` (the ``spotckpt event=...`` lines on
stderr) and :class:`JsonLinesListener` (one JSON object per line, appended to a file). The manager
subscribes a ``JsonLinesListener`` when ``$SPOTCKPT_EVENTS_FILE`` is set: that is how
``spotckpt simulate`` follows the trainer it supervises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

__all__ = [
    "Event",
    "SaveEvent",
    "DurableLocalEvent",
    "DurableS3Event",
    "RestoreEvent",
    "PreemptedEvent",
    "ProgressEvent",
    "GraceBudgetEvent",
    "AutopilotEvent",
    "Listener",
    "EventBus",
    "JsonLinesListener",
    "EVENT_TYPES",
    "parse_event_line",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event: ``time`` is the wall clock (Unix seconds) when it was emitted."""

    name: ClassVar[str] = "event"
    step: int | None
    time: float = field(default_factory=time.time, compare=False)

    def fields(self) -> dict[str, Any]:
        """The payload in its stable order, without ``time`` and without unset optional values."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "time":
                continue
            v = getattr(self, f.name)
            if v is None and f.name != "step":
                continue
            out[f.name] = v
        return out


@dataclass(frozen=True, kw_only=True)
class SaveEvent(Event):
    name: ClassVar[str] = "save"
    stall_s: float
    bytes: int
    blocking: bool


@dataclass(frozen=True, kw_only=True)
class DurableLocalEvent(Event):
    name: ClassVar[str] = "durable_local"
    seconds: float
    bytes: int


@dataclass(frozen=True, kw_only=True)
class DurableS3Event(Event):
    name: ClassVar[str] = "durable_s3"
    seconds: float
    bytes: int
    since_save_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class RestoreEvent(Event):
    name: ClassVar[str] = "restore"
    seconds: float
    source: str
    bytes: int


@dataclass(frozen=True, kw_only=True)
class PreemptedEvent(Event):
    name: ClassVar[str] = "preempted"
    reason: str


@dataclass(frozen=True, kw_only=True)
class ProgressEvent(Event):
    name: ClassVar[str] = "progress"


@dataclass(frozen=True, kw_only=True)
class GraceBudgetEvent(Event):
    """What a final save would take now (:mod:`spotckpt.autopilot`): ``need_s`` with nothing else
    on its way to S3, ``need_busy_s`` when SIGTERM comes while the previous save is still being
    written and uploaded; ``fits``/``fits_busy``: within the safe share of ``grace_s``."""

    name: ClassVar[str] = "grace_budget"
    need_s: float
    grace_s: float
    fits: bool
    need_busy_s: float
    fits_busy: bool


@dataclass(frozen=True, kw_only=True)
class AutopilotEvent(Event):
    """:class:`spotckpt.policy.AutoInterval` chose a new interval (``steps``: at the measured step
    time, 0 when unknown); ``why`` says which bound decided, in one token."""

    name: ClassVar[str] = "autopilot"
    interval_s: float
    steps: int
    rate_per_h: float
    cost_s: float
    why: str


#: Event classes by their stable name.
EVENT_TYPES: dict[str, type[Event]] = {
    cls.name: cls
    for cls in (SaveEvent, DurableLocalEvent, DurableS3Event, RestoreEvent, PreemptedEvent, ProgressEvent,
                GraceBudgetEvent, AutopilotEvent)
}

Listener = Callable[[Event], None]


class EventBus:
    """Hands each emitted event to every subscribed listener. Thread-safe: any thread may
    ``subscribe``, ``emit`` or call the returned unsubscribe function."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: tuple[Listener, ...] = ()
        self._per_step: tuple[Listener, ...] = ()  # those that also take ProgressEvent (every step)

    def subscribe(self, listener: Listener, *, progress: bool = True) -> Callable[[], None]:
        """Add ``listener``; returns a function that removes it again. ``progress=False``: it
        does not want the ``progress`` event of every step (kept off the training hot path)."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
            if progress:
                self._per_step = (*self._per_step, listener)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not listener)
                self._per_step = tuple(x for x in self._per_step if x is not listener)

        return unsubscribe

    @property
    def takes_progress(self) -> bool:
        """Whether a listener wants the per-step ``progress`` event (else the hot path builds none)."""
        return bool(self._per_step)

    def emit(self, event: Event) -> None:
        listeners = self._per_step if type(event) is ProgressEvent else self._listeners
        for listener in listeners:  # a snapshot: the tuple is replaced, never mutated
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - observing must never break a save
                log.exception("spotckpt: event listener %r failed on %s", listener, event.name)


class JsonLinesListener:
    """Appends one JSON object per event to ``path``: ``{"event": name, "time": t, ...fields}``.

    Each line is written with a single ``write`` on an ``O_APPEND`` descriptor, so a reader
    tailing the file sees whole lines, and several processes may share one file. A write error
    (full disk) is logged once and otherwise ignored. ``close()`` releases the descriptor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._warned = False

    def __call__(self, event: Event) -> None:
        fd = self._fd
        if fd is None:
            return
        rec = {"event": event.name, "time": round(event.time, 6), **event.fields()}
        try:
            os.write(fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("spotckpt: cannot write events to %s (%s)", self.path, exc)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def parse_event_line(line: str | bytes) -> Event | None:
    """The event of one line written by :class:`JsonLinesListener`, or None for a line that is
    not one (partial, foreign, or an unknown event name)."""
    try:
        rec = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(rec, dict):
        return None
    cls = EVENT_TYPES.get(rec.pop("event", None))  # type: ignore[arg-type]
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in rec.items() if k in names})
    except TypeError:
        return None
