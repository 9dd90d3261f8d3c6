"""The autopilot's math and bookkeeping (spotckpt.autopilot): the interval, the rates, the history,
the grace budget from measured times -- pure, no threads, no S3."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from spotckpt.autopilot import (
    ABSORB,
    PRIOR_EVENTS,
    PRIOR_EXPOSURE_S,
    SAFE_SHARE,
    Autopilot,
    History,
    daly_interval,
    parse_rates,
    plan_interval,
    user_rates,
)
from spotckpt.errors import ConfigError
from spotckpt.events import DurableLocalEvent, DurableS3Event, EventBus, GraceBudgetEvent, PreemptedEvent, SaveEvent
from spotckpt.policy import AutoInterval, SaveContext
from spotckpt.tools.simulate.summary import InstanceRecord, JobRecord, summary


def test_daly_interval_is_the_formula() -> None:
    c, m = 2.0, 3600.0
    r = c / (2 * m)
    assert daly_interval(c, m) == pytest.approx(math.sqrt(2 * c * m) * (1 + math.sqrt(r) / 3 + r / 9) - c)
    assert daly_interval(c, m) == pytest.approx(math.sqrt(2 * c * m), rel=0.02)  # ~ Young's
    assert daly_interval(10.0, 4.0) == 4.0  # C >= 2M: M
    assert daly_interval(1.0, math.inf) == math.inf


def test_plan_uses_the_effective_rate_and_documented_clamps() -> None:
    hard, notice = 1 / 3600, 9 / 3600
    fits = plan_interval(cost_s=2.0, to_durable_s=5.0, hard_per_s=hard, notice_per_s=notice, fits=True,
                         fits_busy=True, max_s=1e6)
    assert fits.why == "daly" and fits.interval_s == pytest.approx(daly_interval(2.0, 3600.0))
    assert fits.rate_eff_per_s == pytest.approx(hard)
    unfit = plan_interval(cost_s=2.0, to_durable_s=5.0, hard_per_s=hard, notice_per_s=notice, fits=False,
                          fits_busy=False, max_s=1e6)
    assert unfit.interval_s == pytest.approx(daly_interval(2.0, 360.0))  # every interruption counts
    # only a save on its way makes the final save miss (a share D/t of the time): Young with the
    # cost C + notice * D^2 and the rate without notice -- longer, as fewer saves are on their way
    busy = plan_interval(cost_s=2.0, to_durable_s=5.0, hard_per_s=hard, notice_per_s=notice, fits=True,
                         fits_busy=False, max_s=1e6)
    assert busy.why == "daly+busy" and busy.interval_s == pytest.approx(math.sqrt(2 * (2.0 + notice * 25) / hard),
                                                                        rel=0.03)
    # never more often than the pipeline absorbs; never longer than max; min when asked
    slow = plan_interval(cost_s=0.01, to_durable_s=50.0, hard_per_s=1.0, notice_per_s=0.0, fits=True, fits_busy=True)
    assert slow.why == "pipeline" and slow.interval_s == pytest.approx(ABSORB * 50.0)
    calm = plan_interval(cost_s=1.0, to_durable_s=1.0, hard_per_s=0.0, notice_per_s=1.0, fits=True, fits_busy=True,
                         max_s=900.0)
    assert calm.why == "max" and calm.interval_s == 900.0
    floor = plan_interval(cost_s=0.01, to_durable_s=0.1, hard_per_s=1.0, notice_per_s=0.0, fits=True,
                          fits_busy=True, min_s=30.0)
    assert floor.why == "min" and floor.interval_s == 30.0
    assert "interval" in fits.text and "effective failure rate" in fits.text


def test_rates_from_the_user_a_bucket_and_the_environment() -> None:
    r = user_rates(per_hour=0.5, bucket=None, hard_fraction=None, instances=4)
    assert r is not None and r.per_hour == 2.0 and r.hard_fraction == 0.05
    b = user_rates(per_hour=None, bucket="5-10%", hard_fraction=0.2, instances=None)
    assert b is not None and b.per_hour == pytest.approx(-math.log(0.9) / 720) and b.hard_fraction == 0.2
    e = parse_rates("per_hour=900, hard_fraction=0.3")
    assert e is not None and e.per_hour == 900 and e.hard_fraction == 0.3 and e.source == "env"
    assert parse_rates("") is None and user_rates(per_hour=None, bucket=None, hard_fraction=None, instances=None) is None
    for bad in ("per_hour=x", "rate=3", "bucket=7%", "per_hour=1,bucket=<5%", "per_hour=1,hard_fraction=2"):
        with pytest.raises(ConfigError):
            parse_rates(bad)


@pytest.mark.parametrize("text, says", [
    ("per_hour=", "per_hour must be a number of interruptions per hour, got ''"),
    ("per_hour=1;hard_fraction=0.1", "comma-separated"),
    ("per_hour=1,instances=1.5", "instances must be a whole number"),
    ("per_hour=inf", "finite number"),
    ("per_hour=1e400", "finite number"),
    ("hard_fraction=0.1", "add the rate"),
    ("instances=4", "add the rate"),
])
def test_careless_rates_in_the_environment_say_what_to_do(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match="SPOTCKPT_INTERRUPTIONS") as err:
        parse_rates(text)
    assert says in str(err.value)


@pytest.mark.parametrize("kw, says", [
    ({"interruptions_per_hour": "0.05"}, "finite number >= 0"),
    ({"interruptions_per_hour": math.inf}, "finite number >= 0"),
    ({"interruptions_per_hour": math.nan}, "finite number >= 0"),
    ({"hard_fraction": 0.3}, "hard_fraction qualifies a rate you give"),
    ({"instances": 4, "hard_fraction": 0.3}, "hard_fraction and instances qualify"),
    ({"interruptions_per_hour": 1.0, "hard_fraction": "0.3"}, "a number in [0, 1]"),
])
def test_careless_auto_interval_arguments_are_config_errors(kw: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match="AutoInterval") as err:
        AutoInterval(**kw)  # type: ignore[arg-type]
    assert says in str(err.value)


def test_a_new_job_says_its_rates_are_the_prior_and_how_to_give_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOTCKPT_INTERRUPTIONS", raising=False)
    p = AutoInterval()
    p.bind(Autopilot(EventBus(), grace_seconds=120.0, uploads=False))
    source = p.current_rates()[2]
    assert source.startswith("the prior (no interruption recorded yet") and "SPOTCKPT_INTERRUPTIONS" in source


def test_auto_interval_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPOTCKPT_INTERRUPTIONS", "per_hour=3600,hard_fraction=0.25")
    p = AutoInterval()
    hard, notice, source = p.current_rates()
    assert (hard, notice, source) == (pytest.approx(0.25), pytest.approx(0.75), "env")
    assert AutoInterval(interruptions_per_hour=36.0, hard_fraction=0.5).current_rates()[2] == "user"  # args win


def test_rate_estimate_from_a_recorded_history() -> None:
    doc = {"instances": [[0.0, 1000.0, 1], [1010.0, 3010.0, 0], [3020.0, 4020.0, 1], [4030.0, 5030.0, None]]}
    h = History.restored(doc, final=False, now=6000.0)  # the writer of the restored step: periodic -> 0
    assert [r[2] for r in h.past] == [1, 0, 1, 0]
    unsaved, saved, exposure = h.counts(now=6100.0)
    assert (unsaved, saved) == (2, 2) and exposure == pytest.approx(1000 + 2000 + 1000 + 1000 + 100)
    lu, ls = h.rates(now=6100.0)
    assert lu == pytest.approx((2 + PRIOR_EVENTS) / (5100 + PRIOR_EXPOSURE_S))
    assert ls == pytest.approx((2 + PRIOR_EVENTS) / (5100 + PRIOR_EXPOSURE_S))
    fresh = History(now=0.0)  # no history: the prior alone, one of each kind per day
    assert fresh.rates(now=0.0)[0] * 86400 == pytest.approx(1.0)
    assert History.restored({"instances": [[1.0, 2.0, None]]}, final=True, now=3.0).past[0][2] == 1
    rows = fresh.rows(now=5.0, final=True)
    assert rows[-1] == [0.0, 5.0, 1]


def _feed(bus: EventBus, step: int, *, stall: float, write: float, up: float, nbytes: int) -> None:
    bus.emit(SaveEvent(step=step, stall_s=stall, bytes=nbytes, blocking=False))
    bus.emit(DurableLocalEvent(step=step, seconds=write, bytes=nbytes))
    bus.emit(DurableS3Event(step=step, seconds=up, bytes=nbytes, since_save_s=write + up))


def test_grace_budget_from_measured_times_drops_the_first_save_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[GraceBudgetEvent] = []
    bus.subscribe(lambda ev: seen.append(ev) if isinstance(ev, GraceBudgetEvent) else None)
    pilot = Autopilot(bus, grace_seconds=10.0, uploads=True)
    mb = 10**6
    _feed(bus, 1, stall=0.5, write=4.0, up=20.0, nbytes=100 * mb)  # the first, slower save
    assert seen[-1].need_s == pytest.approx(24.0) and not seen[-1].fits
    _feed(bus, 2, stall=0.1, write=1.0, up=2.0, nbytes=100 * mb)
    _feed(bus, 3, stall=0.1, write=1.2, up=2.5, nbytes=100 * mb)
    b = seen[-1]
    # slowest write of the kept samples + the bytes at the lowest measured throughput (40 MB/s)
    assert b.need_s == pytest.approx(1.2 + 100 / 40)
    assert b.need_busy_s == pytest.approx(b.need_s + (1.2 - 0.1) + 100 / 40)
    assert b.fits == (b.need_s <= SAFE_SHARE * 10) and b.fits and b.fits_busy
    assert pilot.costs().stall_s == pytest.approx(0.1)  # the first save's stall is gone
    warnings = [r for r in caplog.records if "grace budget" in r.getMessage()]
    assert len(warnings) == 1 and "longer grace" in warnings[0].getMessage()
    extra = pilot.manifest_extra()
    assert "final_save" not in extra and extra["autopilot"]["costs"]["bytes"] == 100 * mb
    bus.emit(PreemptedEvent(step=4, reason="signal SIGTERM"))
    extra = pilot.manifest_extra()
    assert extra["final_save"] is True and extra["autopilot"]["instances"][-1][2] == 1


def test_auto_interval_probes_then_plans_and_replans() -> None:
    bus = EventBus()
    pilot = Autopilot(bus, grace_seconds=120.0, uploads=True)
    policy = AutoInterval(interruptions_per_hour=360.0, hard_fraction=0.5, probe_steps=5)
    policy.bind(pilot)
    ctx = lambda step, secs, last: SaveContext(step=step, seconds_since_last_save=secs, last_saved_step=last)  # noqa: E731
    assert not policy.should_save(ctx(1, 0.1, None)) and not policy.should_save(ctx(4, 0.4, None))
    assert policy.should_save(ctx(5, 0.5, None))  # the probe: measure the costs
    assert not policy.should_save(ctx(9, 99.0, 5))  # probed; nothing planned yet, no second probe
    _feed(bus, 5, stall=0.02, write=0.1, up=0.2, nbytes=10**6)
    _feed(bus, 6, stall=0.02, write=0.1, up=0.2, nbytes=10**6)
    assert policy.plan is not None and policy.interval_s == pytest.approx(daly_interval(0.02, 20.0))
    assert not policy.should_save(ctx(20, policy.interval_s * 0.9, 6))
    assert policy.should_save(ctx(20, policy.interval_s, 6))
    assert pilot.costs().step_s == pytest.approx(policy.interval_s / 14)
    _feed(bus, 20, stall=0.02, write=0.1, up=20.0, nbytes=10**6)  # uploads slow down: the pipeline bounds it
    assert policy.plan.why == "pipeline" and policy.interval_s >= ABSORB * 0.3
    naive = AutoInterval(interruptions_per_hour=360.0, hard_fraction=0.5, notice_aware=False)
    naive.bind(pilot)
    assert naive.replan() is not None and naive.plan.rate_eff_per_s == pytest.approx(0.1)


def test_a_restart_plans_from_the_recorded_costs_at_once_and_saves_an_interval_after_the_restore(tmp_path: Path) -> None:
    # The benchmark's "noticed" schedule: one interruption per 3 s, 10 % without notice (M = 30 s),
    # a 2 ms stall: Young/Daly ~0.35 s. A restarted run takes the recorded costs: no probe, no save
    # right after the restore, and its own first (slower) save does not move the plan.
    bus, pilot, policy = _restarted_on_noticed(tmp_path, 262)
    want = daly_interval(0.002, 30.0)
    assert policy.plan is not None and policy.plan.why == "daly" and 0.3 < want < 0.4
    assert policy.interval_s == pytest.approx(want)
    ctx = lambda step, secs: SaveContext(step=step, seconds_since_last_save=secs, last_saved_step=262)  # noqa: E731
    assert not policy.should_save(ctx(263, 0.01)) and not policy.should_save(ctx(270, want * 0.99))
    assert policy.should_save(ctx(285, want))
    _feed(bus, 285, stall=0.013, write=0.2, up=0.1, nbytes=3 * 10**6)  # this process's first save: slow
    assert pilot.costs().stall_s == pytest.approx(0.002) and policy.interval_s == pytest.approx(want)
    naive = AutoInterval(interruptions_per_hour=1200.0, hard_fraction=0.1, notice_aware=False)
    naive.bind(pilot)
    naive.replan()
    assert naive.interval_s == pytest.approx(max(daly_interval(0.002, 3.0), ABSORB * 0.06))  # ~3x shorter


def test_the_checkpoint_cost_is_the_mean_stall_with_its_slow_tail() -> None:
    # Young/Daly needs the expected cost of a checkpoint: stalls of 2 ms with one in four at 20 ms
    # (a save that met the previous upload) cost 6.5 ms on average, not the median's 2 ms.
    bus = EventBus()
    pilot = Autopilot(bus, grace_seconds=5.0, uploads=True)
    policy = AutoInterval(interruptions_per_hour=1200.0, hard_fraction=0.1)
    policy.bind(pilot)
    _feed(bus, 10, stall=0.5, write=0.01, up=0.05, nbytes=10**6)  # the first save: dropped
    for step, stall in zip(range(20, 100, 10), [0.002, 0.002, 0.002, 0.02, 0.002, 0.002, 0.002, 0.02]):
        _feed(bus, step, stall=stall, write=0.01, up=0.05, nbytes=10**6)
    c = pilot.costs()
    assert c.stall_s == pytest.approx(0.002) and c.stall_mean_s == pytest.approx(0.0065)
    assert policy.plan is not None and policy.plan.cost_s == pytest.approx(0.0065)
    assert policy.interval_s == pytest.approx(daly_interval(0.0065, 30.0))
    assert pilot.manifest_extra()["autopilot"]["costs"]["stall_s"] == pytest.approx(0.0065)  # the next run's C


def test_auto_interval_rejects_bad_arguments() -> None:
    for kw in ({"min_interval_seconds": 5.0, "max_interval_seconds": 1.0}, {"probe_steps": 0},
               {"interruptions_per_hour": -1.0}, {"frequency_bucket": "3%"}, {"hard_fraction": 1.5}):
        with pytest.raises(ConfigError):
            AutoInterval(**kw)  # type: ignore[arg-type]


def test_summary_splits_wasted_time_and_marks_interruptions_without_notice() -> None:
    a = InstanceRecord(number=1, started_s=0.0, ended_s=10.0, training_s=1.0, sigterm_s=9.0, interrupted=True,
                       killed=True, notice=False, stall_s=0.25, progress=((1, 2.0), (5, 6.0), (8, 9.0)),
                       saves=((5, 6.0),), grace_fits=True, grace_fits_busy=True)
    b = InstanceRecord(number=2, started_s=11.0, ended_s=20.0, training_s=13.0, restored_step=5, stall_s=0.5,
                       restore_source="s3://b/j", progress=((6, 14.0), (10, 18.0)), exit_code=0)
    s = summary(JobRecord(job="j", command=("x",), s3_uri="s3://b/j", seed=0, wall_start=0.0, end_s=20.0,
                          outcome="Completed", spot_price_ratio=0.3, instances=(a, b), hard_kill_fraction=1.0))
    it = s["interruptions"][0]
    assert it["notice"] is False and it["sigterm_outcome"] == "no-notice" and it["grace_budget_fits"] is True
    assert s["interruptions_without_notice"] == 1 and s["hard_kill_fraction"] == 1.0
    assert s["wasted_seconds"] == {"total": pytest.approx(0.75 + 3.0 + 2.0), "checkpoint_stalls": 0.75,
                                   "lost_work": 3.0, "restart_restore": 2.0}


def test_no_extra_log_noise_without_auto(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spotckpt.autopilot")
    bus = EventBus()
    Autopilot(bus, grace_seconds=120.0, uploads=False)
    bus.emit(SaveEvent(step=1, stall_s=0.01, bytes=10, blocking=True))
    bus.emit(DurableLocalEvent(step=1, seconds=0.02, bytes=10))
    assert not [r for r in caplog.records if r.name == "spotckpt.autopilot"]  # fits: no warning, no plan line


def test_the_interval_is_counted_in_steps_of_undisturbed_training(tmp_path: Path) -> None:
    # On a busy machine the steps right after a save run slower while it persists and uploads.
    # Counting wall seconds, a 0.3 s interval of 15 ms steps would then end after fewer than its
    # 20 steps; counted in steps (the step time taken in each interval's second half) it does not,
    # and a wall-clock ceiling of twice the interval still saves when the steps turn slow for good.
    bus, pilot, policy = _restarted_on_noticed(tmp_path, 100)
    want = daly_interval(0.002, 30.0)
    n = round(want / 0.015)
    assert policy.interval_steps == n and n > 10
    ctx = lambda step, secs, last=100: SaveContext(step=step, seconds_since_last_save=secs, last_saved_step=last)  # noqa: E731
    slow_start = 0.06  # the first steps after the restore (or a save): 4 x 15 ms slower
    half = 100 + n // 2
    assert not policy.should_save(ctx(half, slow_start + (n // 2) * 0.015))  # halfway: seen, not due
    assert not policy.should_save(ctx(100 + n - 1, want + 0.01))  # the interval's seconds passed, its steps not
    assert policy.should_save(ctx(100 + n, slow_start + n * 0.015))
    assert pilot.costs().step_s == pytest.approx(0.015)  # the second half's step time, not the slowed mean
    assert not policy.should_save(ctx(100 + n + 3, 2 * want * 0.99, 100 + n))
    assert policy.should_save(ctx(100 + n + 3, 2 * want, 100 + n))  # slow steps: the clock's ceiling



def test_a_bound_is_counted_in_seconds() -> None:
    # The pipeline bound (1.5 x time to durable) is about wall time -- how fast saves can
    # persist and upload -- so an interval set by it is counted in seconds, not steps.
    bus = EventBus()
    pilot = Autopilot(bus, grace_seconds=5.0, uploads=True)
    policy = AutoInterval(interruptions_per_hour=1200.0, hard_fraction=0.1)
    policy.bind(pilot)
    _feed(bus, 10, stall=0.002, write=0.01, up=0.05, nbytes=10**6)
    pilot.note_step_time(0.015)
    _feed(bus, 30, stall=0.002, write=0.01, up=0.05, nbytes=10**6)
    assert policy.plan is not None and policy.plan.why == "daly" and policy.interval_steps is not None
    _feed(bus, 50, stall=0.002, write=0.01, up=5.0, nbytes=10**6)  # uploads slow down: 1.5 x ~5 s to durable
    _feed(bus, 70, stall=0.002, write=0.01, up=5.0, nbytes=10**6)
    assert policy.plan.why == "pipeline" and policy.interval_steps is None
    ctx = lambda step, secs: SaveContext(step=step, seconds_since_last_save=secs, last_saved_step=70)  # noqa: E731
    assert not policy.should_save(ctx(5000, policy.interval_s * 0.99)) and policy.should_save(ctx(71, policy.interval_s))


def _restarted_on_noticed(tmp_path: Path, step: int) -> tuple[EventBus, Autopilot, AutoInterval]:
    """A run restarted at ``step`` of the benchmark's "noticed" schedule (one interruption per 3 s,
    10 % without notice), from a step whose manifest recorded a 2 ms stall and 15 ms steps."""
    costs = {"stall_s": 0.002, "write_s": 0.012, "upload_bps": 1e8, "to_durable_s": 0.06, "step_s": 0.015,
             "bytes": 3 * 10**6}
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"final_save": True, "autopilot": {"v": 1, "instances": [[0.0, 50.0, None]], "costs": costs}}))
    bus = EventBus()
    pilot = Autopilot(bus, grace_seconds=5.0, uploads=True)
    policy = AutoInterval(interruptions_per_hour=1200.0, hard_fraction=0.1)
    policy.bind(pilot)
    pilot.restored(step, tmp_path, 0.08)
    return bus, pilot, policy


@pytest.mark.parametrize("spelled", ["auto", "Auto", " AUTO ", "auto\n"])
def test_every_steps_auto_is_read_however_it_is_spelled(spelled: str) -> None:
    from spotckpt.core.preemption import PreemptionWatcher
    from spotckpt.core.schedule import SaveSchedule

    sched = SaveSchedule(PreemptionWatcher(), every_steps=spelled, every_seconds=None, save_policy=None,
                         clock=lambda: 0.0)
    assert isinstance(sched.policy, AutoInterval)


@pytest.mark.parametrize("bad", ["autos", "500", 2.5, True, 0, -5])
def test_a_wrong_every_steps_names_auto_among_the_choices(bad: object) -> None:
    from spotckpt.core.preemption import PreemptionWatcher
    from spotckpt.core.schedule import SaveSchedule

    with pytest.raises(ConfigError, match=r'positive int, "auto" \(the autopilot chooses the interval\) or None'):
        SaveSchedule(PreemptionWatcher(), every_steps=bad, every_seconds=None, save_policy=None,  # type: ignore[arg-type]
                     clock=lambda: 0.0)


def test_the_public_modules_are_attributes_of_a_bare_import() -> None:
    import subprocess
    import sys

    code = ("import spotckpt; p = spotckpt.policy.AutoInterval(interruptions_per_hour=0.05); "
            "print(type(p).__name__, spotckpt.events.EventBus.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AutoInterval", "EventBus"]
