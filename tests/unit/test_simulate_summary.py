"""``spotckpt simulate``'s summary from hand-made records, and its pure parts (events tail, schedule)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotckpt.events import ProgressEvent, RestoreEvent
from spotckpt.tools.simulate.follow import EventsTail, InstanceTracker
from spotckpt.tools.simulate.schedule import Observation, Scheduler, Trigger
from spotckpt.tools.simulate.summary import SAVINGS_FORMULA, InstanceRecord, JobRecord, format_summary, summary


def _job(*instances: InstanceRecord, end_s: float, ratio: float = 1.0, outcome: str = "Completed",
         planned: int | None = None) -> JobRecord:
    return JobRecord(job="sim-test", command=("python", "train.py"), s3_uri="s3://b/sim-test", seed=0,
                     wall_start=1_700_000_000.0, end_s=end_s, outcome=outcome, spot_price_ratio=ratio,
                     instances=instances, interruptions_planned=planned)


def _steps(first: int, last: int, t0: float, dt: float) -> tuple[tuple[int, float], ...]:
    return tuple((s, t0 + (s - first) * dt) for s in range(first, last + 1))


# Instance 1: starts at 0, trains steps 1..50 (t = 1.0 .. 5.9), saved step 40, SIGTERM at 6.0,
# saves step 50 on the way out. Instance 2 starts at 8.0 (2 s waiting for capacity), restores 50
# and trains to 100, exits 0 at 14.0. The job ends at 14.0.
I1 = InstanceRecord(number=1, started_s=0.0, ended_s=6.5, training_s=1.0, sigterm_s=6.0, interrupted=True,
                    exit_code=0, step_at_sigterm=50, progress=_steps(1, 50, 1.0, 0.1), saves=((40, 4.9), (50, 6.2)))
I2 = InstanceRecord(number=2, started_s=8.0, ended_s=14.0, training_s=9.0, exit_code=0, restored_step=50,
                    restore_source="s3://b/sim-test", progress=_steps(51, 100, 9.1, 0.1), saves=((100, 14.0),))


def test_training_billable_and_savings_follow_sagemakers_formula() -> None:
    s = summary(_job(I1, I2, end_s=14.0, ratio=1.0))
    assert s["TrainingTimeInSeconds"] == 14.0
    assert s["instance_seconds"] == 12.5  # 6.5 + 6.0; the 1.5 s wait is not billed
    assert s["BillableTimeInSeconds"] == 12.5
    assert s["unbilled_wait_seconds"] == 1.5
    assert s["savings_percent"] == pytest.approx((1 - 12.5 / 14.0) * 100, abs=0.005)
    assert s["savings_formula"] == SAVINGS_FORMULA


def test_spot_price_ratio_scales_billable_time_and_is_stated() -> None:
    s = summary(_job(I1, I2, end_s=14.0, ratio=0.3))
    assert s["BillableTimeInSeconds"] == pytest.approx(12.5 * 0.3)
    assert s["savings_percent"] == pytest.approx((1 - 3.75 / 14.0) * 100, abs=0.005)
    assert s["savings_from_waits_only_percent"] == pytest.approx((1 - 12.5 / 14.0) * 100, abs=0.005)
    assert s["spot_price_ratio"] == 0.3 and "0.3 x on-demand" in s["savings_assumption"]
    assert "70 % off" in s["savings_assumption"]
    text = format_summary(s)
    assert "assuming spot price = 0.3 x on-demand (--spot-price-ratio)" in text
    json.dumps(s)  # JSON-ready


def test_interruption_that_lost_nothing() -> None:
    (it,) = summary(_job(I1, I2, end_s=14.0))["interruptions"]
    assert it["instance"] == 1 and it["step_at_interruption"] == 50 and it["during_training"] is True
    assert it["ran_seconds"] == 6.5
    assert it["last_step_reached"] == 50 and it["restored_step"] == 50
    assert it["lost_steps"] == 0 and it["lost_seconds"] == 0.0
    assert it["seconds_to_resume"] == 1.0  # Starting (8.0) to Training (9.0)
    assert it["downtime_seconds"] == 3.0  # SIGTERM (6.0) to Training (9.0)
    assert it["interrupted_at"] == "2023-11-14T22:13:26.000Z"  # wall_start + 6 s


def test_lost_steps_and_seconds_when_the_next_instance_restores_an_older_step() -> None:
    # Killed without a final save: the next instance restores step 40, so 10 steps are lost, and
    # the time instance 1 spent between step 40 (t=4.9) and step 50 (t=5.9).
    i1 = InstanceRecord(**{**I1.__dict__, "killed": True, "exit_code": -9, "saves": ((40, 4.9),)})
    i2 = InstanceRecord(**{**I2.__dict__, "restored_step": 40, "progress": _steps(41, 100, 9.1, 0.1)})
    s = summary(_job(i1, i2, end_s=14.0))
    (it,) = s["interruptions"]
    assert it["killed_after_grace"] is True and it["exit_code"] == -9
    assert it["lost_steps"] == 10 and it["lost_seconds"] == pytest.approx(1.0)
    assert s["lost_steps_total"] == 10 and s["lost_seconds_total"] == pytest.approx(1.0)
    assert "[ignored SIGTERM: SIGKILLed]" in format_summary(s)


def test_restored_step_falls_back_to_first_progress_without_a_restore_event() -> None:
    i2 = InstanceRecord(number=2, started_s=8.0, ended_s=14.0, training_s=9.0, exit_code=0,
                        progress=_steps(1, 100, 9.1, 0.05))  # nothing restored: starts at step 1
    (it,) = summary(_job(I1, i2, end_s=14.0))["interruptions"]
    assert it["restored_step"] == 0 and it["lost_steps"] == 50
    assert it["lost_seconds"] == pytest.approx(5.9 - 1.0)  # all of instance 1's training


def test_final_step_comes_from_the_final_instance_even_without_progress() -> None:
    # The new user's bug: a trainer restored at its last step reports no progress at all.
    late = InstanceRecord(number=1, started_s=0.0, ended_s=6.5, training_s=1.0, sigterm_s=6.2, interrupted=True,
                          exit_code=0, step_at_sigterm=120, progress=_steps(1, 120, 1.0, 0.04),
                          saves=((120, 6.0),))
    idle = InstanceRecord(number=2, started_s=7.0, ended_s=8.0, training_s=7.5, exit_code=0, restored_step=120,
                          restore_source="s3://b/sim-test")
    s = summary(_job(late, idle, end_s=8.0))
    assert s["final_step"] == 120
    (it,) = s["interruptions"]
    assert it["during_training"] is False
    assert "[after the final step]" in format_summary(s)
    saved_only = InstanceRecord(number=1, started_s=0.0, ended_s=1.0, exit_code=0, saves=((7, 0.9),))
    assert summary(_job(saved_only, end_s=1.0))["final_step"] == 7
    assert summary(_job(InstanceRecord(number=1, started_s=0.0, exit_code=1), end_s=1.0))["final_step"] is None


def test_fewer_interruptions_than_planned_are_noted() -> None:
    only = InstanceRecord(number=1, started_s=0.0, ended_s=3.0, training_s=1.0, exit_code=0,
                          progress=_steps(1, 10, 1.0, 0.1))
    s = summary(_job(only, end_s=3.0, planned=2))
    assert s["interruptions"] == [] and s["final_step"] == 10
    assert "0 of 2 interruptions happened: the job finished first" in s["notes"]
    assert "note: 0 of 2 interruptions happened" in format_summary(s)
    assert not summary(_job(only, end_s=3.0, planned=2, outcome="Failed"))["notes"]


def test_an_instance_still_running_is_billed_to_the_end() -> None:
    running = InstanceRecord(number=1, started_s=0.5, sigterm_s=9.0, progress=_steps(1, 5, 1.0, 1.0))
    s = summary(_job(running, end_s=10.0, outcome="MaxWaitTimeExceeded"))
    assert s["instance_seconds"] == 9.5 and s["final_step"] == 5 and s["interruptions"] == []


def test_zero_training_time_gives_zero_savings() -> None:
    s = summary(_job(end_s=0.0))
    assert s["savings_percent"] == 0.0 and s["instances"] == 0 and s["final_step"] is None


# -- the events tail ---------------------------------------------------------------------------

def test_events_tail_reads_only_whole_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventsTail(path)
    assert tail.read() == []  # not there yet
    with open(path, "ab") as f:
        f.write(b'{"event":"progress","time":1.0,"step":1}\n{"event":"progress","time":2.0,"st')
        f.flush()
        assert [e.step for e in tail.read()] == [1]  # the partial line waits
        f.write(b'ep":2}\nnot json\n{"event":"nope","time":3,"step":3}\n')
        f.flush()
        assert [e.step for e in tail.read()] == [2]  # foreign lines are skipped
        assert tail.read() == []
        f.write(b'{"event":"restore","time":4.0,"step":2,"seconds":0.1,"source":"s3://b/p","bytes":9}\n')
        f.flush()
        (ev,) = tail.read()
    assert isinstance(ev, RestoreEvent) and ev.source == "s3://b/p"
    tail.close()


def test_instance_tracker_maps_event_times_and_dedupes_progress() -> None:
    tr = InstanceTracker(1, started_s=0.0, from_wall=lambda t: t - 100.0)
    assert tr.ingest([RestoreEvent(step=5, seconds=0.1, source="s3", bytes=1, time=100.5)], now_s=0.6) is False
    assert tr.ingest([ProgressEvent(step=6, time=101.0), ProgressEvent(step=6, time=101.1),
                      ProgressEvent(step=7, time=101.2)], now_s=1.3) is True
    assert tr.ingest([], now_s=1.4) is False
    rec = tr.record()
    assert rec.restored_step == 5 and rec.progress == ((6, 1.0), (7, pytest.approx(1.2)))
    assert tr.first_progress_seen_s == 1.3 and rec.resumed_from == 5 and rec.last_step == 7


# -- the schedule ------------------------------------------------------------------------------

def _obs(*, now: float = 10.0, seen: float | None = 0.0, first: int | None = 1, last: int | None = 5,
         new: bool = True) -> Observation:
    return Observation(now_s=now, first_progress_seen_s=seen, first_step=first, last_step=last, new_progress=new)


def test_interruptions_fire_only_on_fresh_progress_and_before_the_final_step() -> None:
    sch = Scheduler(interruptions=1, every_seconds=None, seed=0, total_steps=None)
    trig = sch.plan(1, [])
    assert trig is not None and trig.after_seconds is not None and 0.5 <= trig.after_seconds <= 2.0
    assert sch.plan(2, [0]) is None  # only the first N instances
    assert not sch.fires(trig, _obs(new=False))  # no new progress: the trainer may be finishing
    assert not sch.fires(trig, _obs(now=0.4))  # not due yet
    assert sch.fires(trig, _obs())
    assert not sch.fires(None, _obs())
    bounded = Scheduler(interruptions=1, every_seconds=None, seed=0, total_steps=5)
    assert not bounded.fires(Trigger(after_seconds=0.1), _obs(last=5))  # the final step: never


@pytest.mark.parametrize("total,n", [(120, 2), (60, 2), (10, 3), (1000, 5), (3, 2)])
def test_step_targets_lie_inside_the_run_in_order(total: int, n: int) -> None:
    for seed in range(20):
        sch = Scheduler(interruptions=n, every_seconds=None, seed=seed, total_steps=total)
        targets = [sch.plan(k, []).at_step for k in range(1, n + 1)]  # type: ignore[union-attr]
        assert all(t is not None and 1 <= t < total for t in targets), targets
        assert targets == sorted(targets)
        assert sch.plan(n + 1, []) is None


def test_step_trigger_needs_progress_in_this_instance() -> None:
    sch = Scheduler(interruptions=1, every_seconds=None, seed=0, total_steps=100)
    trig = Trigger(at_step=30)
    assert not sch.fires(trig, _obs(first=41, last=41))  # resumed past the target: train a step first
    assert sch.fires(trig, _obs(first=41, last=42))
    assert not sch.fires(trig, _obs(first=1, last=29))


def test_every_seconds_gives_up_after_restarts_that_resume_from_no_newer_step() -> None:
    sch = Scheduler(interruptions=None, every_seconds=2.0, seed=1)
    trig = sch.plan(1, [])
    assert trig is not None and 1.0 <= (trig.after_seconds or 0) <= 3.0
    assert sch.plan(4, [0, 10, 20]) is not None  # progressing
    assert sch.plan(4, [0, 0, 0]) is not None  # 2 stalls
    assert sch.plan(5, [0, 0, 0, 0]) is None  # 3 stalls in a row
    assert len(sch.notes) == 1 and "no newer step" in sch.notes[0]


def test_hard_kills_are_drawn_apart_from_the_times_and_the_rate_reaches_the_trainer() -> None:
    from spotckpt.tools.simulate.schedule import Scheduler

    plain = Scheduler(interruptions=None, every_seconds=3.0, seed=4)
    hard = Scheduler(interruptions=None, every_seconds=3.0, seed=4, hard_kill_fraction=0.5)
    a = [plain.plan(n, []) for n in range(1, 41)]
    b = [hard.plan(n, []) for n in range(1, 41)]
    assert [t.after_seconds for t in a] == [t.after_seconds for t in b]  # the same times for the seed
    assert all(t.notice for t in a) and 5 < sum(not t.notice for t in b) < 35
    assert hard.trainer_env() == {"SPOTCKPT_INTERRUPTIONS": "per_hour=1200,hard_fraction=0.5"}
    assert Scheduler(interruptions=2, every_seconds=None, seed=0).trainer_env() == {}


def test_every_steps_draws_the_same_steps_and_kinds_for_a_seed_whatever_the_trainer_does() -> None:
    def draws(seed: int, resumed: list[int | None]) -> list[tuple[int | None, bool]]:
        sch = Scheduler(interruptions=None, every_seconds=None, every_steps=50, seed=seed, total_steps=5000,
                        hard_kill_fraction=0.3, step_seconds=0.01)
        out = []
        for n in range(1, 200):
            t = sch.plan(n, resumed[: n - 1])
            if t is None:
                break
            out.append((t.at_step, t.notice))
        return out

    a = draws(7, list(range(0, 5000, 40)))  # resumed from newer steps every time
    b = draws(7, [r - 13 for r in range(0, 5000, 40)])  # a policy that lost 13 steps each time
    assert a == b and a != draws(8, list(range(0, 5000, 40)))
    steps = [s for s, _ in a]
    assert all(s is not None and 0 < s < 5000 for s in steps)
    assert all(y - x >= 2 for x, y in zip(steps, steps[1:]))  # strictly increasing, never adjacent
    assert 80 <= len(steps) <= 120  # about every 50 steps of 5000
    assert 10 < sum(not k for _, k in a) < 50  # ~30 % without notice
    sch = Scheduler(interruptions=None, every_seconds=None, every_steps=50, seed=7, total_steps=5000,
                    hard_kill_fraction=0.3, step_seconds=0.01)
    assert sch.trainer_env() == {"SPOTCKPT_INTERRUPTIONS": "per_hour=7200,hard_fraction=0.3"}  # one per 0.5 s
    assert sch.notes == []
    untold = Scheduler(interruptions=None, every_seconds=None, every_steps=50, seed=7)
    assert untold.trainer_env() == {} and "--step-seconds" in untold.notes[0]
    assert untold.plan(1, []) is not None  # no total: interrupted for as long as the job runs
    assert untold.plan(5, [0, 0, 0, 0]) is None  # a trainer that never saves: the same give-up rule
