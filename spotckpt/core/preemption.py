"""Noticing an interruption: SIGTERM (and other signals), with a deadline.

:class:`PreemptionWatcher` is the only process-wide state spotckpt keeps. Its signal handler only
sets a flag and a deadline, then chains to the Python handler that was installed before it; the
previous handler is restored on :meth:`PreemptionWatcher.uninstall`.

Threads: ``install``/``uninstall`` run on the main thread (Python only lets the main thread set
signal handlers); ``requested``/``deadline``/``seconds_left`` may be read from any thread;
:meth:`request` may be called from any thread (e.g. a metadata poller).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from collections.abc import Callable
from types import FrameType
from typing import Any

from spotckpt.errors import ConfigError

__all__ = ["PreemptionWatcher", "DEFAULT_GRACE_SECONDS", "ImdsPoller", "DEFAULT_IMDS_ENDPOINT"]

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

    def take_over(self) -> bool:
        """Make this watcher's handler the one for its signals again, without calling handlers
        installed after it: a framework's own SIGTERM handling that would stop one rank on its
        own (Lightning's runs a collective from inside its handler) must not run beside the
        agreement that stops every rank at one step. Main thread only; False when not installed
        or off the main thread. ``uninstall`` restores what was there before ``install``."""
        if not self._installed or threading.current_thread() is not threading.main_thread():
            return False
        for sig in self.signals:
            if signal.getsignal(sig) != self._handle:
                signal.signal(sig, self._handle)
        return True

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


# -- EC2 spot interruption notice (IMDSv2) ---------------------------------------------------

#: The instance metadata service; ``$SPOTCKPT_IMDS_ENDPOINT`` overrides it.
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
_TOKEN_PATH = "/latest/api/token"
_ACTION_PATH = "/latest/meta-data/spot/instance-action"
_REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
_TOKEN_TTL_SECONDS = 21600


class ImdsPoller:
    """Polls EC2 instance metadata (IMDSv2) for a spot interruption notice; opt-in.

    Every ``interval_seconds`` it fetches a session token (``PUT /latest/api/token``, reused until
    shortly before its TTL ends or a 401), then ``GET /latest/meta-data/spot/instance-action``:

    - 200 with ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}`` calls
      ``watcher.request("EC2 spot notice: <action> at <time>", deadline_in_seconds=time - now)``
      once, and the poller stops (the notice cannot be withdrawn);
    - 404 means no notice: nothing happens;
    - an unreachable endpoint, a timeout, an HTTP error or a malformed body has no effect either: it
      is logged once (info, then debug) and polling goes on. Metadata is often unreachable from a
      training container, so the poller is never required.

    The rebalance recommendation (``/latest/meta-data/events/recommendations/rebalance``, an earlier
    and weaker hint than the notice) is only logged, once, by default; with
    ``watch_rebalance=True`` it requests a checkpoint too, with the watcher's own grace period as
    the deadline (a rebalance recommendation carries no termination time).

    Only ``urllib.request`` is used, with proxies disabled (metadata must never go through an
    HTTP proxy). The endpoint is ``endpoint``, else ``$SPOTCKPT_IMDS_ENDPOINT``, else
    http://169.254.169.254.

    Threads: ``start``/``close`` are called by the owner (the manager or the user, any one thread);
    polling runs on the ``spotckpt-imds`` daemon thread, which only calls ``watcher.request``
    (thread-safe). ``close`` stops and joins it.
    """

    def __init__(
        self,
        watcher: PreemptionWatcher,
        *,
        endpoint: str | None = None,
        interval_seconds: float = 5.0,
        timeout_seconds: float = 1.0,
        watch_rebalance: bool = False,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_seconds > 0:
            raise ConfigError(f"interval_seconds must be > 0, got {interval_seconds!r}")
        if not timeout_seconds > 0:
            raise ConfigError(f"timeout_seconds must be > 0, got {timeout_seconds!r}")
        ep = endpoint or os.environ.get("SPOTCKPT_IMDS_ENDPOINT") or DEFAULT_IMDS_ENDPOINT
        if not ep.startswith(("http://", "https://")):
            raise ConfigError(f"IMDS endpoint must be an http:// URL, got {ep!r} (check SPOTCKPT_IMDS_ENDPOINT)")
        self.endpoint = ep.rstrip("/")
        self.watcher = watcher
        self.interval_seconds = float(interval_seconds)
        self.timeout_seconds = float(timeout_seconds)
        self.watch_rebalance = bool(watch_rebalance)
        self._wall_clock = wall_clock
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None
        self._token_expires = 0.0  # monotonic
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported_failure = False
        self._rebalance_seen = False
        #: The parsed notice once one arrived (read from any thread after it is set).
        self.notice: dict[str, Any] | None = None
        self.polls = 0

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> ImdsPoller:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spotckpt-imds", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join()

    def __enter__(self) -> ImdsPoller:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.poll_once():
                    return
            except Exception:  # never let the poller die on something unexpected
                log.exception("spotckpt: IMDS poll failed unexpectedly; polling continues")
            self._stop.wait(self.interval_seconds)

    # -- one poll ------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """One poll (on the poller thread, or directly in tests); True once a notice was delivered."""
        self.polls += 1
        try:
            token = self._get_token()
            status, body = self._get(_ACTION_PATH, token)
            if status == 401:  # token expired or revoked: fetch a new one next time
                self._token = None
                return False
            if status == 200:
                return self._on_notice(body)
            if status != 404:
                self._failed(f"HTTP {status} from {_ACTION_PATH}")
                return False
            self._check_rebalance(token)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # URLError, timeouts, refused connections are OSErrors; HTTPException: not HTTP at all;
            # ValueError: a malformed token, body or time.
            self._failed(f"{type(exc).__name__}: {exc}")
        return False

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout_seconds) as resp:
                return resp.status, resp.read(65536)
        except urllib.error.HTTPError as exc:
            with exc:
                return exc.code, b""

    def _get_token(self) -> str:
        now = time.monotonic()
        if self._token is None or now >= self._token_expires:
            status, body = self._request(
                "PUT", _TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(_TOKEN_TTL_SECONDS)}
            )
            if status != 200 or not body:
                raise ValueError(f"IMDSv2 token request answered HTTP {status}")
            self._token = body.decode("ascii", "strict").strip()
            self._token_expires = now + _TOKEN_TTL_SECONDS - 60
        return self._token

    def _get(self, path: str, token: str) -> tuple[int, bytes]:
        return self._request("GET", path, {"X-aws-ec2-metadata-token": token})

    def _failed(self, why: str) -> None:
        if not self._reported_failure:
            self._reported_failure = True
            log.info("spotckpt: EC2 metadata at %s not usable (%s); spot notices will not be seen "
                     "from there, SIGTERM still works", self.endpoint, why)
        else:
            log.debug("spotckpt: IMDS poll failed: %s", why)

    def _on_notice(self, body: bytes) -> bool:
        doc = json.loads(body.decode("utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("time"), str):
            raise ValueError(f"instance-action is not {{'action', 'time'}}: {body[:200]!r}")
        action = str(doc.get("action", "terminate"))
        when = _parse_iso_utc(doc["time"])
        left = when.timestamp() - self._wall_clock()
        self.notice = {"action": action, "time": doc["time"]}
        self.watcher.request(f"EC2 spot notice: {action} at {doc['time']}", deadline_in_seconds=left)
        return True

    def _check_rebalance(self, token: str) -> None:
        if self._rebalance_seen:
            return
        status, body = self._get(_REBALANCE_PATH, token)
        if status != 200:
            return
        self._rebalance_seen = True
        if self.watch_rebalance:
            self.watcher.request(f"EC2 rebalance recommendation: {body[:200].decode('utf-8', 'replace')}")
        else:
            log.warning("spotckpt: EC2 rebalance recommendation received (%s); an interruption "
                        "notice may follow", body[:200].decode("utf-8", "replace"))


def _parse_iso_utc(text: str) -> datetime:
    """``2026-11-27T00:12:00Z`` (and offsets) to an aware datetime; naive times are taken as UTC."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)  # ValueError on garbage
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
