"""Checkpoint autopilot: the grace budget, the interruption rates, and the interval they imply.

An interruption *with notice* (SIGTERM, then SIGKILL after the grace) costs no work when the final
save fits in the grace; only failures *without* notice -- a host lost, or a noticed interruption
whose final save does not fit -- need periodic checkpoints. So the interval comes from the rate of
those (the *effective* failure rate), not from the raw interruption rate.

Parts (one :class:`Autopilot` per :class:`~spotckpt.CheckpointManager`, whatever its save policy):

- **costs**, measured online from the manager's events (``save``: the stall; ``durable_local``:
  save to committed, stall included; ``durable_s3``: the upload of a step, manifest included, its
  bytes, and save to in-S3). Each figure keeps its last :data:`WINDOW` samples; the process's
  first sample is dropped as soon as another exists (the first save allocates the staging buffers
  and opens the S3 connections), and a figure recorded by the run before (see history) counts as
  another. The planner uses the median -- but the *mean* stall as the checkpoint cost (Young/Daly
  needs the expected cost, and stalls have a slow tail: saves that meet the previous upload); the
  grace budget the slowest sample (throughput: the lowest).
- **the grace budget** (``event=grace_budget``, ``mgr.stats.grace_*``), published when a save's
  last event arrived (in S3, or committed locally without S3) and at restore when the costs come
  from history::

      need_s      = write (stall included) + bytes / upload throughput    (manifest inside the upload)
      need_busy_s = need_s + the previous save's remaining write + its upload  (SIGTERM while a save
                                                                            is on its way: the final
                                                                            one queues behind it)

  ``fits``/``fits_busy``: within :data:`SAFE_SHARE` of the grace. When ``need_busy_s`` does not
  fit, one warning says what to do.
- **history**: every manifest that ``save()`` writes carries ``"autopilot"`` in its extras:
  ``{"v": 1, "instances": [[start, last, final], ...], "costs": {...}}`` -- one entry per
  instance (process) of the job: its start and its newest save (Unix seconds) and whether it ended
  with a final (preemption) save (1), without one (0), or unknown (null: it is the writer). A
  restart restores the newest step in S3 and so learns how the previous instance ended: its step
  is a final save (1) or a periodic one (0: a host lost, or a final save that missed the grace).
  The history travels with the checkpoints (S3 included), so it survives every restart; an
  instance that died before its first save reached S3 is not seen (the rate is then a little low).
  At most :data:`HISTORY_LIMIT` instances are kept.
- **rates** (:class:`Rates`): from the user (``AutoInterval(interruptions_per_hour=...)``, an AWS
  interruption-frequency bucket, or ``$SPOTCKPT_INTERRUPTIONS``), else from the history with a
  Gamma prior: ``rate = (k + PRIOR_EVENTS) / (exposure + PRIOR_EXPOSURE_S)`` for k interruptions
  (with and without a final save, each) over the instances' observed training seconds -- the prior
  alone is one interruption of each kind per day.

:func:`daly_interval` and :func:`plan_interval` are the interval math; the policy itself is
:class:`spotckpt.policy.AutoInterval` (that module imports this one, never the other way).

``$SPOTCKPT_INTERRUPTIONS`` (what ``spotckpt simulate --interrupt-every`` sets): comma-separated
``key=value`` -- ``per_hour=R`` (interruptions per instance-hour) or ``bucket=<5%|5-10%|10-15%|
15-20%|>20%`` (AWS Spot Advisor's monthly interruption frequency), ``hard_fraction=F`` (the share
without notice, default :data:`DEFAULT_HARD_FRACTION`), ``instances=N`` (default 1; the job is
interrupted when any of its instances is).

Threads: listeners run on the emitting thread (training, persist, uploader); one lock guards the
state; :meth:`AutoInterval.should_save` (training thread, every step) reads one float.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotckpt.errors import ConfigError
from spotckpt.events import DurableLocalEvent, DurableS3Event, Event, EventBus, GraceBudgetEvent, PreemptedEvent, SaveEvent

__all__ = [
    "SAFE_SHARE", "ABSORB", "WINDOW", "HISTORY_LIMIT", "DEFAULT_HARD_FRACTION", "PRIOR_EVENTS", "PRIOR_EXPOSURE_S",
    "BUCKETS", "ENV_VAR", "Rates", "parse_rates", "History", "Costs", "Budget", "Autopilot",
    "daly_interval", "plan_interval", "Plan",
]

log = logging.getLogger(__name__)

#: A final save "fits" when it needs at most this share of the grace (the rest is margin: a slower
#: disk or network at that moment, the signal's own delivery, the process's exit).
SAFE_SHARE = 0.75
#: Never save more often than every ``ABSORB`` x (save to durable): the persist pipeline (local
#: write, upload) must keep up, with room to spare, or saves queue and the final one waits.
ABSORB = 1.5
#: Samples kept per measured figure.
WINDOW = 8
#: Instances kept in the history.
HISTORY_LIMIT = 64
#: Share of interruptions without notice when the user gives a rate but not this share: on EC2
#: and SageMaker a spot interruption comes with notice; hosts lost without one are assumed 1 in 20.
DEFAULT_HARD_FRACTION = 0.05
#: The Gamma prior of the rates estimated from history: PRIOR_EVENTS interruptions of each kind
#: (with and without a final save) per PRIOR_EXPOSURE_S training seconds -- one per day.
PRIOR_EVENTS = 0.5
PRIOR_EXPOSURE_S = 12 * 3600.0
#: AWS Spot Advisor's interruption-frequency buckets (share of instances interrupted in a month)
#: -> the upper end, as a monthly probability (">20%": 30 %).
BUCKETS = {"<5%": 0.05, "5-10%": 0.10, "10-15%": 0.15, "15-20%": 0.20, ">20%": 0.30}
ENV_VAR = "SPOTCKPT_INTERRUPTIONS"
_MONTH_H = 30 * 24.0


# -- rates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rates:
    """Interruptions of the job per hour (all instances) and the share of them without notice."""

    per_hour: float
    hard_fraction: float
    source: str  # "user", "env", "history"

    @property
    def per_second(self) -> float:
        return self.per_hour / 3600.0


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_rates(per_hour: float | None, bucket: str | None, hard: float | None, instances: int | None,
                 where: str) -> None:
    if per_hour is not None and bucket is not None:
        raise ConfigError(f"{where}: give interruptions per hour or a frequency bucket, not both")
    if per_hour is not None and not (_number(per_hour) and 0 <= per_hour < math.inf):
        raise ConfigError(f"{where}: interruptions per hour must be a finite number >= 0 (e.g. 0.05: about one a "
                          f"day), got {per_hour!r}")
    if bucket is not None and bucket not in BUCKETS:
        raise ConfigError(f"{where}: the frequency bucket is one of {', '.join(BUCKETS)}, got {bucket!r}")
    if hard is not None and not (_number(hard) and 0 <= hard <= 1):
        raise ConfigError(f"{where}: the share without notice (hard_fraction) is a number in [0, 1], got {hard!r}")
    if instances is not None and (isinstance(instances, bool) or not isinstance(instances, int) or instances < 1):
        raise ConfigError(f"{where}: instances must be an int >= 1, got {instances!r}")
    if per_hour is None and bucket is None and (hard is not None or instances is not None):
        given = [n for n, v in (("hard_fraction", hard), ("instances", instances)) if v is not None]
        raise ConfigError(f"{where}: {' and '.join(given)} {'qualify' if len(given) > 1 else 'qualifies'} a rate you "
                          "give; add the rate (interruptions per hour or a frequency bucket), or drop "
                          f"{'them' if len(given) > 1 else 'it'} to let the job's recorded history set the rates")


def user_rates(*, per_hour: float | None, bucket: str | None, hard_fraction: float | None,
               instances: int | None, source: str = "user") -> Rates | None:
    """The job's rates from what the user said (None when no rate was given). A bucket's monthly
    probability p becomes ``-ln(1 - p) / 720`` per hour; both are per instance, x ``instances``."""
    _check_rates(per_hour, bucket, hard_fraction, instances, "AutoInterval" if source == "user" else f"${ENV_VAR}")
    if per_hour is None and bucket is None:
        return None
    rate = per_hour if per_hour is not None else -math.log(1.0 - BUCKETS[bucket]) / _MONTH_H  # type: ignore[index]
    return Rates(float(rate) * (instances or 1), DEFAULT_HARD_FRACTION if hard_fraction is None else float(hard_fraction),
                 source)


def parse_rates(text: str | None) -> Rates | None:
    """``$SPOTCKPT_INTERRUPTIONS`` (see the module docstring) as :class:`Rates`; None when unset."""
    if text is None or not text.strip():
        return None
    kv: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k not in ("per_hour", "bucket", "hard_fraction", "instances"):
            raise ConfigError(f"${ENV_VAR}={text!r}: expected per_hour=R or bucket=B, optionally hard_fraction=F "
                              "and instances=N, comma-separated")
        kv[k] = v.strip()

    def num(key: str, kind: type, what: str) -> Any:
        if key not in kv:
            return None
        try:
            return kind(kv[key])
        except ValueError:
            raise ConfigError(f"${ENV_VAR}={text!r}: {key} must be {what}, got {kv[key]!r} (keys are "
                              "comma-separated, e.g. per_hour=0.05,hard_fraction=0.1,instances=4)") from None

    per_hour = num("per_hour", float, "a number of interruptions per hour")
    hard = num("hard_fraction", float, "a number in [0, 1]")
    inst = num("instances", int, "a whole number >= 1")
    return user_rates(per_hour=per_hour, bucket=kv.get("bucket"), hard_fraction=hard, instances=inst, source="env")


# -- history ---------------------------------------------------------------------------------------
class History:
    """The job's instances (see the module docstring): ``[start, last, final]`` each."""

    def __init__(self, instances: list[list[Any]] | None = None, *, now: float | None = None) -> None:
        self.past: list[list[Any]] = [list(x) for x in (instances or [])][-HISTORY_LIMIT + 1:]
        self.start = time.time() if now is None else now

    @classmethod
    def restored(cls, doc: dict[str, Any] | None, *, final: bool, now: float | None = None) -> History:
        """The history of a restored step's manifest: its writer ended with a final save or not."""
        rows: list[list[Any]] = []
        for row in (doc or {}).get("instances") or []:
            if isinstance(row, list) and len(row) == 3 and all(isinstance(x, (int, float)) for x in row[:2]):
                rows.append([float(row[0]), float(row[1]), row[2] if row[2] in (0, 1) else None])
        if rows and rows[-1][2] is None:
            rows[-1][2] = 1 if final else 0
        for r in rows[:-1]:  # an unresolved older entry: its successor saw nothing of it
            if r[2] is None:
                r[2] = 0
        return cls(rows, now=now)

    def rows(self, *, now: float, final: bool | None) -> list[list[Any]]:
        """What a save writes: the past instances and this one (``final``: 1 for the final save)."""
        return [*self.past, [round(self.start, 3), round(now, 3), 1 if final else None]]

    def counts(self, now: float) -> tuple[int, int, float]:
        """(interruptions without a final save, with one, exposure seconds incl. this instance)."""
        unsaved = sum(1 for r in self.past if r[2] == 0)
        saved = sum(1 for r in self.past if r[2] == 1)
        exposure = sum(max(0.0, r[1] - r[0]) for r in self.past) + max(0.0, now - self.start)
        return unsaved, saved, exposure

    def rates(self, now: float) -> tuple[float, float]:
        """Per second: (interruptions without a usable final save, with one), Gamma posterior means."""
        unsaved, saved, exposure = self.counts(now)
        t = exposure + PRIOR_EXPOSURE_S
        return (unsaved + PRIOR_EVENTS) / t, (saved + PRIOR_EVENTS) / t


def read_step_extra(step_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The extras of a committed step's manifest (``{}`` when unreadable: the history is advisory)."""
    try:
        doc = json.loads((Path(step_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


# -- costs -----------------------------------------------------------------------------------------
class Robust:
    """The last :data:`WINDOW` samples of one figure; this process's first sample is dropped as
    soon as another (or a prior) exists."""

    def __init__(self) -> None:
        self._first: float | None = None
        self._seen = False
        self._rest: deque[float] = deque(maxlen=WINDOW)

    def prior(self, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            self._rest.append(float(value))

    def add(self, value: float) -> None:
        if self._seen:
            self._rest.append(value)
        else:
            self._first, self._seen = value, True

    def _samples(self) -> list[float]:
        if self._rest:
            return list(self._rest)
        return [] if self._first is None else [self._first]

    @property
    def typical(self) -> float | None:
        s = self._samples()
        return statistics.median(s) if s else None

    @property
    def mean(self) -> float | None:
        s = self._samples()
        return statistics.fmean(s) if s else None

    @property
    def high(self) -> float | None:
        s = self._samples()
        return max(s) if s else None

    @property
    def low(self) -> float | None:
        s = self._samples()
        return min(s) if s else None


@dataclass(frozen=True)
class Costs:
    """A snapshot of the measured costs (seconds; ``None``: not measured yet)."""

    stall_s: float | None  # median
    write_s: float | None  # save() to committed locally (stall included), median
    write_high_s: float | None
    upload_bps: float | None  # bytes per second of a step's upload (manifest included), median
    upload_low_bps: float | None
    bytes: int | None  # the newest step's size in S3 (or saved, without S3)
    to_durable_s: float | None  # save() to durable (in S3 with S3, else committed), median
    step_s: float | None  # training seconds per step, between saves
    restore_s: float | None
    stall_mean_s: float | None = None  # the planner's checkpoint cost: Young/Daly needs the expected stall


@dataclass(frozen=True)
class Budget:
    need_s: float
    need_busy_s: float
    grace_s: float
    write_s: float
    upload_s: float

    @property
    def safe_s(self) -> float:
        return SAFE_SHARE * self.grace_s

    @property
    def fits(self) -> bool:
        return self.need_s <= self.safe_s

    @property
    def fits_busy(self) -> bool:
        return self.need_busy_s <= self.safe_s


# -- the interval math -----------------------------------------------------------------------------
def daly_interval(cost_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum of the compute time between checkpoints (J. T. Daly, 2006):
    ``sqrt(2CM) * (1 + sqrt(C/2M)/3 + C/18M) - C`` for C < 2M, else M (to first order Young's
    ``sqrt(2CM)``; the restart time R does not move the optimum). ``inf`` when M is."""
    c, m = max(cost_s, 0.0), mtbf_s
    if math.isinf(m):
        return math.inf
    if c >= 2 * m:
        return m
    r = c / (2 * m)
    return math.sqrt(2 * c * m) * (1 + math.sqrt(r) / 3 + r / 9) - c


@dataclass(frozen=True)
class Plan:
    interval_s: float
    why: str  # "daly", "daly+busy", "pipeline", "min", "max"
    rate_eff_per_s: float
    cost_s: float
    text: str


def plan_interval(*, cost_s: float, to_durable_s: float, hard_per_s: float, notice_per_s: float,
                  fits: bool, fits_busy: bool, min_s: float = 0.0, max_s: float = 3600.0) -> Plan:
    """The interval (seconds of training between saves): Young/Daly with the effective failure
    rate ``hard + notice * P(the final save does not fit)``, clamped to ``[max(min_s, ABSORB *
    to_durable_s), max_s]``. P is 0 or 1 when ``fits == fits_busy``; otherwise a noticed
    interruption is lost only while a save is on its way (a share ``to_durable_s / interval``),
    and the interval minimises ``C/t + rate(t) * (t/2 + to_durable_s)`` on a grid instead."""
    c = max(cost_s, 1e-6)
    lo = max(min_s, ABSORB * to_durable_s)
    hi = max(max_s, lo)

    def rate(t: float) -> float:
        busy = min(1.0, to_durable_s / t) if t > 0 else 1.0
        miss = (0.0 if fits_busy else busy) + (0.0 if fits else 1.0 - busy)
        return hard_per_s + notice_per_s * miss

    if fits == fits_busy:
        lam = rate(1.0)
        t = daly_interval(c, 1.0 / lam if lam > 0 else math.inf)
        why = "daly"
    else:
        grid = [lo * (hi / lo) ** (i / 400) for i in range(401)] if lo > 0 else             [hi * 10 ** (-6 + 6 * i / 400) for i in range(401)]
        t = min(grid, key=lambda x: c / x + rate(x) * (x / 2 + to_durable_s))
        lam = rate(t)
        why = "daly+busy"
    if t < lo:
        t, why = lo, ("pipeline" if ABSORB * to_durable_s >= min_s else "min")
    elif t > hi:
        t, why = hi, "max"
    mtbf = f"{1 / lam:.4g} s" if lam > 0 else "inf"
    text = (f"interval {t:.4g} s ({why}): checkpoint cost {c:.4g} s, effective failure rate {lam * 3600:.4g}/h "
            f"(without notice {hard_per_s * 3600:.4g}/h + noticed {notice_per_s * 3600:.4g}/h whose final save "
            f"{'fits' if fits and fits_busy else 'fits only when no save is on its way' if fits else 'does not fit'}), "
            f"MTBF {mtbf}; bounds [{lo:.4g}, {hi:.4g}] s (pipeline {ABSORB:g} x {to_durable_s:.4g} s to durable)")
    return Plan(t, why, lam, c, text)


# -- the per-manager tracker -----------------------------------------------------------------------
class Autopilot:
    """Measures costs from ``events``, publishes the grace budget on the same bus, records the
    history; a bound :class:`AutoInterval` re-plans from it. One per manager."""

    def __init__(self, events: EventBus, *, grace_seconds: float, uploads: bool = False,
                 wall: Callable[[], float] = time.time) -> None:
        self.events = events
        self.grace_s = float(grace_seconds)
        self.uploads = uploads
        self._wall = wall
        self._lock = threading.RLock()
        self.stall, self.write, self.bps, self.durable, self.step_s = Robust(), Robust(), Robust(), Robust(), Robust()
        self.restore_s: float | None = None
        self.bytes: int | None = None
        self.history = History(now=wall())
        self.budget: Budget | None = None
        self._final = False
        self._warned = False
        self._listeners: list[Callable[[int | None], None]] = []
        events.subscribe(self, progress=False)  # nothing per step: planning happens at saves

    def on_update(self, fn: Callable[[int | None], None]) -> None:
        """Call ``fn(step)`` whenever the measurements moved (after a save's last event, a restore)."""
        self._listeners.append(fn)

    # listener of the manager's events
    def __call__(self, ev: Event) -> None:
        if isinstance(ev, SaveEvent):
            with self._lock:
                self.stall.add(ev.stall_s)
                if not self.uploads:
                    self.bytes = ev.bytes
        elif isinstance(ev, DurableLocalEvent):
            with self._lock:
                self.write.add(ev.seconds)
                if not self.uploads:
                    self.durable.add(ev.seconds)
            if not self.uploads:
                self._updated(ev.step)
        elif isinstance(ev, DurableS3Event):
            with self._lock:
                if ev.seconds > 0 and ev.bytes > 0:
                    self.bps.add(ev.bytes / ev.seconds)
                self.bytes = ev.bytes
                if ev.since_save_s is not None:
                    self.durable.add(ev.since_save_s)
            self._updated(ev.step)
        elif isinstance(ev, PreemptedEvent):
            self._final = True

    def note_step_time(self, seconds_per_step: float) -> None:
        with self._lock:
            self.step_s.add(seconds_per_step)

    def costs(self) -> Costs:
        with self._lock:
            return Costs(stall_s=self.stall.typical, write_s=self.write.typical, write_high_s=self.write.high,
                         upload_bps=self.bps.typical, upload_low_bps=self.bps.low, bytes=self.bytes,
                         to_durable_s=self.durable.typical, step_s=self.step_s.typical, restore_s=self.restore_s,
                         stall_mean_s=self.stall.mean)

    def compute_budget(self) -> Budget | None:
        """What a final save would take now (see the module docstring); None before measurements."""
        c = self.costs()
        if c.write_high_s is None:
            return None
        upload = 0.0
        if self.uploads:
            if c.upload_low_bps is None or c.bytes is None:
                return None
            upload = c.bytes / c.upload_low_bps
        need = c.write_high_s + upload
        busy = need + max(0.0, c.write_high_s - (c.stall_s or 0.0)) + upload
        return Budget(need, busy, self.grace_s, c.write_high_s, upload)

    def _updated(self, step: int | None) -> None:
        b = self.compute_budget()
        if b is not None:
            self.budget = b
            self.events.emit(GraceBudgetEvent(step=step, need_s=b.need_s, grace_s=b.grace_s, fits=b.fits,
                                              need_busy_s=b.need_busy_s, fits_busy=b.fits_busy))
            if not b.fits_busy and not self._warned:
                self._warned = True
                c = self.costs()
                what = (f"a final save needs about {b.need_s:.3g} s" if not b.fits else
                        f"a final save needs {b.need_s:.3g} s, but {b.need_busy_s:.3g} s when the interruption "
                        "comes while the previous save is still on its way")
                log.warning(
                    "spotckpt: grace budget: %s (local write %.3g s + upload %.3g s of %.3g MB at %.3g MB/s) and "
                    "the grace is %.3g s (safe share %.0f %% = %.3g s): a noticed interruption may lose the work "
                    "since the last checkpoint in S3 -- save fewer bytes (drop what restore does not need), use "
                    "faster storage, ask for a longer grace (SPOTCKPT_GRACE_SECONDS, the platform's stop timeout), "
                    "or upload faster (S3 transfer concurrency, or local-only checkpoints synced by the platform); "
                    "AutoInterval counts such interruptions as failures without notice",
                    what, b.write_s, b.upload_s, (c.bytes or 0) / 1e6, (c.upload_low_bps or 0) / 1e6,
                    b.grace_s, SAFE_SHARE * 100, b.safe_s)
        for fn in list(self._listeners):
            try:
                fn(step)
            except Exception:  # noqa: BLE001 - planning must never break a save
                log.exception("spotckpt: autopilot update failed")

    # history
    def restored(self, step: int, step_dir: str | os.PathLike[str] | None, seconds: float | None = None) -> None:
        """A restore loaded ``step`` from ``step_dir``: take its history and recorded costs."""
        extra = read_step_extra(step_dir) if step_dir is not None else {}
        doc = extra.get("autopilot") if isinstance(extra.get("autopilot"), dict) else None
        with self._lock:
            self.restore_s = seconds
            self.history = History.restored(doc, final=bool(extra.get("final_save")), now=self._wall())
            costs = (doc or {}).get("costs") or {}
            if isinstance(costs, dict):
                self.stall.prior(costs.get("stall_s"))
                self.write.prior(costs.get("write_s"))
                self.bps.prior(costs.get("upload_bps"))
                self.durable.prior(costs.get("to_durable_s"))
                self.step_s.prior(costs.get("step_s"))
                if self.bytes is None and isinstance(costs.get("bytes"), int):
                    self.bytes = costs["bytes"]
        self._updated(step)

    def manifest_extra(self) -> dict[str, Any]:
        """What ``save()`` adds to a manifest's extras: ``final_save`` on the preemption save, and
        ``autopilot`` (the history and the measured costs)."""
        c = self.costs()
        # the mean stall: the next run's checkpoint cost
        costs = {k: v for k, v in (("stall_s", c.stall_mean_s), ("write_s", c.write_s), ("upload_bps", c.upload_bps),
                                   ("to_durable_s", c.to_durable_s), ("step_s", c.step_s), ("bytes", c.bytes))
                 if v is not None}
        out: dict[str, Any] = {"autopilot": {"v": 1, "instances": self.history.rows(now=self._wall(), final=self._final),
                                             "costs": costs}}
        if self._final:
            out["final_save"] = True
        return out
