"""Listeners that turn :mod:`spotckpt.events` into figures: metric lines and ``mgr.stats``.

:class:`MetricsListener` prints one line per save, upload, restore and preemption in a stable
``key=value`` format::

    spotckpt event=save step=1200 stall_s=0.0812 bytes=1073741824 blocking=0
    spotckpt event=durable_local step=1200 seconds=1.5320 bytes=1073741824
    spotckpt event=durable_s3 step=1200 seconds=8.3390 bytes=1073750012 since_save_s=9.8710
    spotckpt event=restore step=1200 seconds=0.9130 source=s3://bucket/job bytes=1073741824
    spotckpt event=preempted step=1234 reason=signal_SIGTERM
    spotckpt event=grace_budget step=1200 need_s=14.2100 grace_s=120.0000 fits=1 need_busy_s=27.9000 fits_busy=1
    spotckpt event=autopilot step=1200 interval_s=1840.0000 steps=3680 rate_per_h=0.0210 cost_s=0.0812 why=daly

so SageMaker ``MetricDefinitions`` can scrape them, e.g.
``{"Name": "ckpt:stall_s", "Regex": "event=save .*stall_s=([0-9.]+)"}``. Keys and event names are
part of the public contract: new keys may be added at the end, existing ones never change.
Progress events are not printed. With several ranks every line ends with ``rank=R``.

Lines go straight to stderr when enabled, because SageMaker scrapes the container's output and
the library must not configure logging handlers; the logger ``spotckpt.metrics`` gets a copy at
DEBUG then (a script that logs at INFO sees each line once), and at INFO when the lines are off
(``metrics=False``, ``SPOTCKPT_METRICS=0``), for whoever wants them in their own logs.

:class:`Stats` (``mgr.stats``) keeps the same figures as counters; it is a listener too.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from spotckpt.events import (
    AutopilotEvent,
    DurableLocalEvent,
    DurableS3Event,
    Event,
    GraceBudgetEvent,
    PreemptedEvent,
    ProgressEvent,
    RestoreEvent,
    SaveEvent,
)

__all__ = ["Stats", "format_line", "MetricsListener", "progress_logger"]

log = logging.getLogger("spotckpt.metrics")  # a stable name for the metric lines, not the module's


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.4f}"
    s = str(v)
    return s.replace(" ", "_").replace("=", ":") or "-"


def format_line(event: str, **fields: Any) -> str:
    return " ".join(["spotckpt", f"event={event}", *(f"{k}={_fmt(v)}" for k, v in fields.items())])


class MetricsListener:
    """Writes the metric line of each event (any thread; one lock around the stream)."""

    def __init__(self, *, stream: TextIO | None = None, enabled: bool = True, rank: int | None = None) -> None:
        self._stream = stream
        self.enabled = enabled
        self.rank = rank  # several ranks: every line ends with rank=R
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        if isinstance(event, ProgressEvent):
            return
        fields = event.fields()
        if self.rank is not None:
            fields["rank"] = self.rank
        line = format_line(event.name, **fields)
        # printed below: the logger's copy at DEBUG, so a script logging at INFO does not show it twice
        log.log(logging.DEBUG if self.enabled else logging.INFO, "%s", line)
        if self.enabled:
            stream = self._stream or sys.stderr
            with self._lock:
                try:
                    stream.write(line + "\n")
                    stream.flush()
                except (OSError, ValueError):
                    pass


@dataclass
class Stats:
    """Counters of one CheckpointManager (``mgr.stats``); the same figures as the metric lines.
    Updated as a listener of the manager's events, plus ``saves_skipped`` by the manager."""

    saves: int = 0
    saves_skipped: int = 0
    last_save_step: int | None = None
    last_stall_s: float = 0.0
    total_stall_s: float = 0.0
    max_stall_s: float = 0.0
    bytes_saved: int = 0
    last_durable_local_s: float | None = None
    last_durable_s3_s: float | None = None
    uploads: int = 0
    restores: int = 0
    restored_step: int | None = None
    restore_source: str | None = None
    restore_s: float | None = None
    preempted_at_step: int | None = None
    grace_need_s: float | None = None  # the grace budget (spotckpt.autopilot): a final save now
    grace_need_busy_s: float | None = None  # ... while the previous save is still on its way
    grace_s: float | None = None
    grace_fits: bool | None = None
    autopilot_interval_s: float | None = None  # AutoInterval's current interval

    def __call__(self, event: Event) -> None:
        if isinstance(event, SaveEvent):
            self.saves += 1
            self.last_save_step = event.step
            self.last_stall_s = event.stall_s
            self.total_stall_s += event.stall_s
            self.max_stall_s = max(self.max_stall_s, event.stall_s)
            self.bytes_saved += event.bytes
        elif isinstance(event, DurableLocalEvent):
            self.last_durable_local_s = event.seconds
        elif isinstance(event, DurableS3Event):
            self.uploads += 1
            if event.since_save_s is not None:
                self.last_durable_s3_s = event.since_save_s
        elif isinstance(event, RestoreEvent):
            self.restores += 1
            self.restored_step = event.step
            self.restore_source = event.source
            self.restore_s = event.seconds
        elif isinstance(event, PreemptedEvent):
            self.preempted_at_step = event.step
        elif isinstance(event, GraceBudgetEvent):
            self.grace_need_s = event.need_s
            self.grace_need_busy_s = event.need_busy_s
            self.grace_s = event.grace_s
            self.grace_fits = event.fits
        elif isinstance(event, AutopilotEvent):
            self.autopilot_interval_s = event.interval_s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress_logger() -> Callable[[int], None]:
    """A download progress callback: a log line every 2 s with the MiB so far."""
    state = {"bytes": 0, "last": time.monotonic()}

    def cb(n: int) -> None:
        state["bytes"] += n
        now = time.monotonic()
        if now - state["last"] > 2.0:
            state["last"] = now
            logging.getLogger("spotckpt.core.restore").info("spotckpt: downloaded %.1f MiB", state["bytes"] / 2**20)

    return cb
