"""Noticing an interruption: SIGTERM (and other signals), with a deadline.

:class:`PreemptionWatcher` is the only process-wide state spotckpt keeps. Its signal handler only
sets a flag and a deadline, then chains to the Python handler that was installed before it; the
previous handler is restored on :meth:`PreemptionWatcher.uninstall`.

Threads: ``install``/``uninstall`` run on the main thread (Python only lets the main thread set
signal handlers); ``requested``/``deadline``/``seconds_left`` may be read from any thread;
:meth:`request` may be called from any thread (e.g. a metadata poller).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from .errors import ConfigError

__all__ = ["PreemptionWatcher", "DEFAULT_GRACE_SECONDS"]

log = logging.getLogger(__name__)

#: SageMaker (and EC2 spot) send SIGKILL 120 s after SIGTERM.
DEFAULT_GRACE_SECONDS = 120.0


class PreemptionWatcher:
    """Turns SIGTERM (or ``request()``) into a flag plus a monotonic deadline."""

    def __init__(
        self,
        *,
        grace_seconds: float = DEFAULT_GRACE_SECONDS,
        signals: tuple[int, ...] = (signal.SIGTERM,),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not grace_seconds > 0:
            raise ConfigError(f"grace_seconds must be > 0, got {grace_seconds!r}")
        self.grace_seconds = float(grace_seconds)
        self.signals = tuple(signals)
        self._clock = clock
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._deadline: float | None = None
        self._reason = ""
        self._previous: dict[int, Any] = {}
        self._installed = False

    # -- handler -------------------------------------------------------------------------
    def install(self) -> bool:
        """Install the handlers; False (with a warning) when not on the main thread."""
        if self._installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "spotckpt: not on the main thread, SIGTERM handler not installed; call "
                "request() yourself when the job is being stopped"
            )
            return False
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self._installed = True
        return True

    def uninstall(self) -> None:
        """Restore the handlers that were installed before ours (main thread only)."""
        if not self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            log.warning("spotckpt: close() off the main thread; signal handlers left in place")
            return
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(f"signal {signal.Signals(signum).name}")
        prev = self._previous.get(signum)
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            prev(signum, frame)

    # -- state ---------------------------------------------------------------------------
    def request(self, reason: str = "requested", *, deadline_in_seconds: float | None = None) -> None:
        """Mark the job as being preempted; the earliest deadline wins."""
        left = self.grace_seconds if deadline_in_seconds is None else max(0.0, deadline_in_seconds)
        with self._lock:
            dl = self._clock() + left
            if self._deadline is None or dl < self._deadline:
                self._deadline = dl
            first = not self._event.is_set()
            if first:
                self._reason = reason
            self._event.set()
        if first:
            # Logging from a signal handler is safe enough for CPython's logging (re-entrant lock).
            log.warning("spotckpt: preemption noticed (%s), %.0f s to save", reason, left)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def deadline(self) -> float | None:
        """Monotonic time by which the final checkpoint must be durable, or None."""
        return self._deadline

    def seconds_left(self) -> float | None:
        dl = self._deadline
        return None if dl is None else max(0.0, dl - self._clock())

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)
