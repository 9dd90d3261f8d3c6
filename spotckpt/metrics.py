"""One line per save, upload and restore, in a stable ``key=value`` format.

Lines look like::

    spotckpt event=save step=1200 stall_s=0.0812 bytes=1073741824 blocking=0
    spotckpt event=durable_local step=1200 seconds=1.532 bytes=1073741824
    spotckpt event=durable_s3 step=1200 seconds=8.3390 bytes=1073750012 since_save_s=9.8710
    spotckpt event=restore step=1200 seconds=0.913 source=s3 bytes=1073741824
    spotckpt event=preempted step=1234 reason=signal_SIGTERM

so SageMaker ``MetricDefinitions`` can scrape them, e.g.
``{"Name": "ckpt:stall_s", "Regex": "event=save .*stall_s=([0-9.]+)"}``. Keys and event names are
part of the public contract: new keys may be added at the end, existing ones never change.

Lines go to the logger ``spotckpt.metrics`` (INFO) and, unless ``SPOTCKPT_METRICS=0``, straight
to stderr, because SageMaker scrapes the container's output and the library must not configure
logging handlers.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any, TextIO

__all__ = ["Stats", "format_line", "MetricsSink"]

log = logging.getLogger("spotckpt.metrics")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.4f}"
    s = str(v)
    return s.replace(" ", "_").replace("=", ":") or "-"


def format_line(event: str, **fields: Any) -> str:
    return " ".join(["spotckpt", f"event={event}", *(f"{k}={_fmt(v)}" for k, v in fields.items())])


class MetricsSink:
    """Writes metric lines; thread-safe (called from the training and background threads)."""

    def __init__(self, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self._stream = stream
        self.enabled = enabled
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> str:
        line = format_line(event, **fields)
        log.info("%s", line)
        if self.enabled:
            stream = self._stream or sys.stderr
            with self._lock:
                try:
                    stream.write(line + "\n")
                    stream.flush()
                except (OSError, ValueError):
                    pass
        return line


@dataclass
class Stats:
    """Counters of one CheckpointManager (``mgr.stats``); the same figures as the metric lines."""

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
    lost_steps: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
