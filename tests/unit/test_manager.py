"""CheckpointManager on the local disk: round trips, async isolation, policy, errors, threads."""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
import torch
from torch import nn

import spotckpt
from spotckpt.remote.memory import MemoryStore
from spotckpt import CheckpointManager, RNGState
from spotckpt.errors import ConfigError, StateError
from tests.helpers import assert_all_steps_verify, assert_state_is_step, empty_state, step_state


def _train_state(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=True) if hasattr(torch.amp, "GradScaler") else None
    st: dict[str, object] = {"model": model, "optim": opt, "sched": sched, "rng": RNGState(), "epoch": 0,
                             "ema": torch.zeros(4)}
    if scaler is not None:
        st["scaler"] = scaler
    return st


def _train(st: dict[str, object], steps: int) -> list[float]:
    model, opt, sched = st["model"], st["optim"], st["sched"]
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8)
        loss = model(x).pow(2).mean()  # type: ignore[operator]
        opt.zero_grad()  # type: ignore[union-attr]
        loss.backward()
        opt.step()  # type: ignore[union-attr]
        sched.step()  # type: ignore[union-attr]
        st["ema"].mul_(0.9).add_(loss.detach())  # type: ignore[union-attr]
        st["epoch"] = int(st["epoch"]) + 1  # type: ignore[call-overload]
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("async_save", [True, False])
def test_resume_continues_identically(tmp_path: Path, async_save: bool) -> None:
    ref = _train_state()
    _train(ref, 5)
    expected_tail = _train(ref, 4)

    st = _train_state()
    _train(st, 5)
    with CheckpointManager(tmp_path, async_save=async_save, metrics=False) as mgr:
        mgr.save(5, st)
    fresh = _train_state(seed=99)
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(fresh) == 5
        assert mgr.latest_step() == 5 and mgr.all_steps() == [5]
    assert fresh["epoch"] == 5
    assert _train(fresh, 4) == expected_tail
    for (k, a), b in zip(ref["model"].state_dict().items(), fresh["model"].state_dict().values()):  # type: ignore[union-attr]
        assert torch.equal(a, b), k
    assert torch.equal(ref["ema"], fresh["ema"])  # type: ignore[arg-type]


def test_tensor_values_restore_in_place(tmp_path: Path) -> None:
    st = {"t": torch.arange(5.0)}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(1, st)
    target = torch.zeros(5)
    alias = target.view(5)
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.restore({"t": target})
    assert torch.equal(alias, torch.arange(5.0))


def test_state_mutated_after_save_never_leaks_into_it(tmp_path: Path) -> None:
    st = step_state(1)
    with CheckpointManager(tmp_path, keep_last=None, metrics=False) as mgr:
        for step in range(1, 6):
            cur = step_state(step)
            for k, v in cur["weights"].items():  # type: ignore[union-attr]
                st["weights"][k].copy_(v)  # type: ignore[index]
            st["step_tensor"].copy_(cur["step_tensor"])  # type: ignore[union-attr]
            st["meta"] = cur["meta"]
            mgr.save(step, st)
            # scribble over everything right after save() returned
            for v in st["weights"].values():  # type: ignore[union-attr]
                v.fill_(-1.0)
            st["step_tensor"].fill_(-1.0)  # type: ignore[union-attr]
            st["meta"]["name"] = "scribbled"  # type: ignore[index]
        mgr.wait()
    assert assert_all_steps_verify(tmp_path) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        target = empty_state()
        with CheckpointManager(tmp_path, metrics=False) as mgr:
            assert mgr.restore(target, step=step) == step
        assert_state_is_step(target, step)


def test_maybe_save_policy_and_keep_last(tmp_path: Path) -> None:
    st = step_state(0, numel=16)
    with CheckpointManager(tmp_path, every_steps=3, keep_last=2, metrics=False) as mgr:
        saved = []
        for s in range(1, 11):
            if mgr.maybe_save(s, st):
                saved.append(s)
            mgr.wait()
        assert saved == [3, 6, 9]
        assert mgr.all_steps() == [6, 9]
        assert mgr.stats.saves == 3


def test_every_seconds_policy(tmp_path: Path) -> None:
    now = [1000.0]
    st = step_state(0, numel=16)
    with CheckpointManager(tmp_path, every_steps=None, every_seconds=60, metrics=False, clock=lambda: now[0]) as mgr:
        assert not mgr.maybe_save(1, st)
        now[0] += 61
        assert mgr.maybe_save(2, st)
        mgr.wait()
        now[0] += 30
        assert not mgr.maybe_save(3, st)
        now[0] += 31
        assert mgr.maybe_save(4, st)
    assert assert_all_steps_verify(tmp_path) == [2, 4]


def test_unsupported_value_raises_state_error_naming_key(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        with pytest.raises(StateError) as ei:
            mgr.save(1, {"good": 1, "cfg": {"fn": lambda x: x}})
        assert ei.value.key_path == "cfg/fn"
        assert mgr.all_steps() == []


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CheckpointManager(tmp_path, every_steps=0)
    with pytest.raises(ConfigError):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ConfigError):
        CheckpointManager(tmp_path, s3_uri="bucket/prefix")
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(spotckpt.SpotCkptError, match=str(f)):
        CheckpointManager(f)


def test_local_dir_discovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "checkpointconfig.json").write_text('{"LocalPath": "%s"}' % (tmp_path / "sm"))
    monkeypatch.setenv("SPOTCKPT_SAGEMAKER_CONFIG_DIR", str(cfg))
    monkeypatch.delenv("SPOTCKPT_LOCAL_DIR", raising=False)
    with CheckpointManager(metrics=False) as mgr:
        assert mgr.local_dir == tmp_path / "sm"
    monkeypatch.setenv("SPOTCKPT_LOCAL_DIR", str(tmp_path / "env"))
    with CheckpointManager(metrics=False) as mgr:
        assert mgr.local_dir == tmp_path / "env"
    with CheckpointManager(tmp_path / "arg", metrics=False) as mgr:
        assert mgr.local_dir == tmp_path / "arg"


def test_corrupt_newest_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with CheckpointManager(tmp_path, keep_last=None, metrics=False) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, step_state(s))
    f3 = tmp_path / "step-000000000003" / "rank-00000.safetensors"
    raw = bytearray(f3.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f3.write_bytes(bytes(raw))
    (tmp_path / "step-000000000002" / "rank-00000.tree.json").write_text("{}")
    target = empty_state()
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(target) == 1
    assert_state_is_step(target, 1)
    assert "rank-00000.safetensors" in caplog.text and "step 3" in caplog.text


def test_no_buffer_growth_over_20_saves(tmp_path: Path) -> None:
    numel = 2 << 20  # 8 MiB per tensor, 32 MiB state
    st = step_state(0, numel=numel)
    proc = psutil.Process()
    rss = []
    with CheckpointManager(tmp_path, keep_last=1, metrics=False) as mgr:
        for s in range(1, 21):
            mgr.save(s, st)
            mgr.wait()
            gc.collect()
            rss.append(proc.memory_info().rss)
        assert mgr.pipeline.stager.capacity_bytes == 4 * numel * 4 + 3 * 4  # one buffer, never regrown
    growth = max(rss[5:]) - rss[4]
    assert growth < 16 << 20, [r >> 20 for r in rss]


def _spotckpt_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("spotckpt-")}


def test_close_joins_every_thread(tmp_path: Path) -> None:
    before = _spotckpt_threads()  # compared by identity: a thread leaked earlier cannot hide ours
    mgr = CheckpointManager(tmp_path, metrics=False)
    mgr.save(1, step_state(1, numel=64))
    started = _spotckpt_threads() - before
    assert {t.name for t in started} >= {"spotckpt-persist"}
    mgr.close()
    assert not any(t.is_alive() for t in started)
    assert _spotckpt_threads() - before == set()
    with pytest.raises(spotckpt.ClosedError, match="closed"):
        mgr.save(2, step_state(2, numel=64))
    with pytest.raises(spotckpt.ClosedError):
        mgr.restore({})


class _MemoryRemote(MemoryStore):
    """The in-memory reference store, telling whether it was closed."""

    closed = False

    def close(self) -> None:
        self.closed = True


def test_failed_construction_leaves_no_handler_and_no_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that catches the error must keep a process that still dies on SIGTERM (the old
    manager installed its handler before a later step could raise) and no running uploader."""
    def handler(signum: int, frame: object) -> None:
        pass

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        before = _spotckpt_threads()
        remote = _MemoryRemote()
        monkeypatch.setenv("SPOTCKPT_IMDS_INTERVAL_SECONDS", "soon")  # fails after the uploader started
        with pytest.raises(ConfigError, match="SPOTCKPT_IMDS_INTERVAL_SECONDS"):
            CheckpointManager(tmp_path, remote_store=remote, imds=True, metrics=False)
        assert signal.getsignal(signal.SIGTERM) is handler
        assert _spotckpt_threads() - before == set()
        assert remote.closed
        monkeypatch.setenv("SPOTCKPT_EVENTS_FILE", str(tmp_path / "no" / "such" / "dir" / "events"))
        with pytest.raises(ConfigError, match="SPOTCKPT_EVENTS_FILE"):
            CheckpointManager(tmp_path, metrics=False)
        assert signal.getsignal(signal.SIGTERM) is handler
        assert _spotckpt_threads() - before == set()
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_sigterm_handler_chains_and_is_restored(tmp_path: Path) -> None:
    seen = []

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        mgr = CheckpointManager(tmp_path, metrics=False, grace_seconds=30)
        assert signal.getsignal(signal.SIGTERM) is not handler  # ours is installed
        assert not mgr.preemption_requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert mgr.preemption_requested and seen == [signal.SIGTERM]
        left = mgr.watcher.seconds_left()
        assert left is not None and 0 < left <= 30
        st = step_state(7, numel=64)
        assert mgr.maybe_save(7, st)  # not a policy step: saved because of the preemption
        assert mgr.preempted
        assert not mgr.maybe_save(8, st)
        mgr.close()
        assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM, signal.SIGTERM]
        target = empty_state(numel=64)
        with CheckpointManager(tmp_path, metrics=False) as m2:
            assert m2.restore(target) == 7
        assert_state_is_step(target, 7, numel=64)
    finally:
        signal.signal(signal.SIGTERM, prev)


def test_events_reach_listeners_and_the_events_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spotckpt.events import DurableLocalEvent, ProgressEvent, SaveEvent, parse_event_line

    path = tmp_path / "events.jsonl"
    monkeypatch.setenv("SPOTCKPT_EVENTS_FILE", str(path))
    seen: list[object] = []
    with CheckpointManager(tmp_path / "c", every_steps=2, metrics=False) as mgr:
        unsubscribe = mgr.events.subscribe(seen.append)
        mgr.events.subscribe(lambda e: 1 / 0)  # a failing listener never breaks a save
        for s in (1, 2):
            mgr.maybe_save(s, step_state(s, numel=64))
        mgr.wait()
        unsubscribe()
        mgr.maybe_save(3, step_state(3, numel=64))
    kinds = [type(e) for e in seen]
    assert kinds.count(ProgressEvent) == 2 and kinds.count(SaveEvent) == 1 and kinds.count(DurableLocalEvent) == 1
    from_file = [parse_event_line(line) for line in path.read_bytes().splitlines()]
    assert [e.name for e in from_file if e is not None] == ["progress", "progress", "save", "durable_local",
                                                            "grace_budget", "progress"]  # issue 19: budget after a save
    assert all(e is not None for e in from_file)
    save = next(e for e in from_file if isinstance(e, SaveEvent))
    assert save.step == 2 and save.bytes > 0 and save.blocking is False


def test_metric_lines_are_stable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointManager(tmp_path, metrics=True) as mgr:
        mgr.save(3, step_state(3, numel=64))
        mgr.wait()
        mgr.restore(empty_state(numel=64))
    err = capsys.readouterr().err
    assert "spotckpt event=save step=3 stall_s=" in err
    assert "spotckpt event=durable_local step=3 seconds=" in err
    assert "spotckpt event=restore step=3 seconds=" in err
    assert mgr.stats.saves == 1 and mgr.stats.restored_step == 3


def test_pickle_needs_explicit_opt_in_on_both_sides(tmp_path: Path) -> None:
    st = {"tags": {"a", "b"}}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        with pytest.raises(StateError, match="tags"):
            mgr.save(1, st)
    with CheckpointManager(tmp_path, metrics=False, allow_pickle=True) as mgr:
        mgr.save(2, st)
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        with pytest.raises(spotckpt.PickleRefusedError, match="allow_pickle=True"):
            mgr.restore({"tags": None})
    target: dict[str, object] = {"tags": None}
    with CheckpointManager(tmp_path, metrics=False, allow_pickle=True) as mgr:
        assert mgr.restore(target) == 2
    assert target["tags"] == {"a", "b"}


def test_a_torchrun_rank_without_a_process_group_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun, building the manager before init_process_group() would make every rank
    write as rank 0 (and collide); it is refused with what to do."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="init_process_group"):
        CheckpointManager(tmp_path, metrics=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.rank == 0 and mgr.world_size == 1


def test_newcomer_inputs_empty_local_dir_integer_like_steps_and_the_keep_last_cap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    for blank in ("", "  "):
        with pytest.raises(ConfigError, match="empty"):  # never a silent /opt/ml/checkpoints
            CheckpointManager(blank, metrics=False)
    monkeypatch.setenv("SPOTCKPT_LOCAL_DIR", " ")
    with pytest.raises(ConfigError, match="SPOTCKPT_LOCAL_DIR is blank"):
        CheckpointManager(metrics=False)
    monkeypatch.delenv("SPOTCKPT_LOCAL_DIR")
    st = step_state(0, numel=16)
    seen: list[list[int]] = []
    with CheckpointManager(tmp_path, keep_last=2, async_save=True, every_steps=1) as mgr:
        mgr.events.subscribe(lambda e: seen.append(mgr.all_steps()) if e.name == "durable_local" else None)
        mgr.save(np.int64(1), st, blocking=True)
        mgr.maybe_save(torch.tensor(2), st)
        for s in (3, 4, 5):
            mgr.save(s, st)
            seen.append(mgr.all_steps())
        mgr.wait()
        assert mgr.all_steps() == [4, 5]
        with pytest.raises(ConfigError, match="non-negative integer"):
            mgr.save(True, st)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="non-negative integer"):
            mgr.save(2.0, st)  # type: ignore[arg-type]
    assert all(len(s) <= 2 for s in seen), seen  # never more than keep_last, even between commit and prune
    # a blocking save's lines come in the order things happened: save, then durable_local
    lines = [ln.split()[1] for ln in capsys.readouterr().err.splitlines() if ln.startswith("spotckpt event=")]
    assert lines[:2] == ["event=save", "event=durable_local"], lines


def test_metric_lines_end_with_the_rank_when_there_are_several() -> None:
    import io

    from spotckpt.events import SaveEvent
    from spotckpt.core.metrics import MetricsListener

    buf = io.StringIO()
    MetricsListener(stream=buf, rank=3)(SaveEvent(step=7, stall_s=0.5, bytes=10, blocking=True))
    MetricsListener(stream=buf)(SaveEvent(step=7, stall_s=0.5, bytes=10, blocking=True))
    first, second = buf.getvalue().splitlines()
    assert first == "spotckpt event=save step=7 stall_s=0.5000 bytes=10 blocking=1 rank=3"
    assert second == "spotckpt event=save step=7 stall_s=0.5000 bytes=10 blocking=1"


def test_a_metric_line_reaches_a_script_logging_at_info_once(caplog: pytest.LogCaptureFixture) -> None:
    import io

    from spotckpt.core.metrics import MetricsListener
    from spotckpt.events import SaveEvent

    ev = SaveEvent(step=7, stall_s=0.5, bytes=10, blocking=True)
    buf = io.StringIO()
    with caplog.at_level(logging.INFO, logger="spotckpt.metrics"):
        MetricsListener(stream=buf)(ev)  # printed: no INFO copy
        assert buf.getvalue().startswith("spotckpt event=save step=7") and not caplog.records
        MetricsListener(stream=buf, enabled=False)(ev)  # off: the logger has it at INFO
        assert [r.getMessage() for r in caplog.records] == [buf.getvalue().strip()]
    with caplog.at_level(logging.DEBUG, logger="spotckpt.metrics"):
        MetricsListener(stream=io.StringIO())(ev)
        assert caplog.records[-1].levelno == logging.DEBUG


def test_rank_without_a_process_group_creates_nothing(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    with pytest.raises(ConfigError, match="init_process_group"):
        CheckpointManager(d, rank=1, metrics=False)
    assert not d.exists()  # refused before anything was created on disk


def test_restore_makes_the_staging_buffer_ready_off_the_training_thread(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The first async save of a large state would allocate and fault in its staging buffer on the
    training thread (0.3 s for 512 MiB on the 2-core VM): restore() has the persist thread do it."""
    import logging

    import spotckpt.manager as manager_mod

    state = {"w": torch.zeros(manager_mod.RESERVE_MIN_BYTES // 4)}
    with caplog.at_level(logging.DEBUG, logger="spotckpt.core.stage"):
        with CheckpointManager(tmp_path, metrics=False) as mgr:
            assert mgr.restore(state) is None  # nothing yet; the buffer is made ready all the same
            mgr.pipeline.persist.join_queue()
            made = [r for r in caplog.records if "staging buffer" in r.getMessage()]
            assert [r.threadName for r in made] == ["spotckpt-persist"]
            assert mgr.pipeline.stager.capacity_bytes >= manager_mod.RESERVE_MIN_BYTES
            mgr.save(1, state)
            mgr.wait()
    assert [r for r in caplog.records if "staging buffer" in r.getMessage()] == made  # the save allocated nothing
    assert assert_all_steps_verify(tmp_path) == [1]


def test_a_failing_preparation_on_the_persist_thread_is_logged_and_saves_go_on(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from spotckpt.core.persist import CallJob

    def fail() -> None:
        raise MemoryError("cannot allocate the staging buffer")

    with caplog.at_level(logging.WARNING, logger="spotckpt.core.persist"):
        with CheckpointManager(tmp_path, metrics=False) as mgr:
            mgr.pipeline.persist.submit(CallJob(fail, "reserving the staging buffer"))
            mgr.save(1, step_state(1))  # async: runs on the same thread, after the failed job
            mgr.wait()
    assert "reserving the staging buffer failed: cannot allocate" in caplog.text
    assert assert_all_steps_verify(tmp_path) == [1]


def test_tensors_on_the_meta_device_are_refused_on_save_and_restore(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        with pytest.raises(StateError, match="meta device has no data"):
            mgr.save(1, {"t": torch.empty(3, device="meta")}, blocking=True)
        assert mgr.all_steps() == []
        mgr.save(2, {"model": nn.Linear(4, 4), "t": torch.ones(3)}, blocking=True)
    with CheckpointManager(tmp_path, metrics=False) as mgr:  # restoring into meta would copy into nothing
        live_t = torch.zeros(3)
        with pytest.raises(StateError, match=r"model/weight: a tensor on the meta device .*to_empty"):
            mgr.restore({"model": nn.Linear(4, 4, device="meta"), "t": live_t})
        assert torch.equal(live_t, torch.zeros(3))  # nothing landed


_UNCLOSED = """
import os, sys, time, torch
_fsync = os.fsync
def slow_fsync(fd):  # the save is surely still in flight when the script ends
    time.sleep(0.5)
    _fsync(fd)
os.fsync = slow_fsync
from spotckpt import CheckpointManager
mgr = CheckpointManager(sys.argv[1], metrics=False)
mgr.save(11, {"w": torch.ones(1000)})
print("script ends", flush=True)
"""


def test_a_manager_left_open_keeps_its_last_save_at_exit(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _UNCLOSED, str(tmp_path / "ck")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "script ends" in res.stdout, res.stderr
    assert "was not closed; closing it at exit so that step 11 is committed locally" in res.stderr, res.stderr
    with CheckpointManager(tmp_path / "ck", metrics=False) as mgr:
        assert mgr.all_steps() == [11]
    res = subprocess.run([sys.executable, "-c", _UNCLOSED.replace("print(", "mgr.close(); print("),
                          str(tmp_path / "ck2")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "not closed" not in res.stderr, res.stderr  # closed: nothing to say


def test_a_newer_step_that_is_not_committed_is_named_when_restore_passes_it_by(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with CheckpointManager(tmp_path, keep_last=None, metrics=False) as mgr:
        for s in (10, 20):
            mgr.save(s, step_state(s, numel=16), blocking=True)
    (tmp_path / "step-000000000020" / "manifest.json").unlink()  # a save that did not finish
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(empty_state(numel=16)) == 10
    said = [r.getMessage() for r in caplog.records if "step-000000000020" in r.getMessage()]
    assert len(said) == 1 and "no manifest.json: a save that did not finish" in said[0] \
        and "the newest committed step is 10" in said[0], said
    (tmp_path / "step-000000000010" / "manifest.json").write_text("garbage")
    with CheckpointManager(tmp_path, metrics=False) as mgr, pytest.raises(spotckpt.AllStepsCorruptError) as ei:
        mgr.restore(empty_state(numel=16))
    assert "not valid JSON" in str(ei.value) and "an older step will be used" not in str(ei.value)


def test_an_optimizer_of_another_kind_is_refused_before_anything_lands(tmp_path: Path) -> None:
    model = nn.Linear(4, 4)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    adam.step()
    torch.optim.lr_scheduler.OneCycleLR(adam, max_lr=1e-2, total_steps=10)  # adds its keys to the groups
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(10, {"model": model, "opt": adam}, blocking=True)
    live = nn.Linear(4, 4)
    before = [p.detach().clone() for p in live.parameters()]
    sgd = torch.optim.SGD(live.parameters(), lr=0.1)
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        with pytest.raises(StateError, match=r"opt: .*lacks \['dampening', 'momentum'\] that the live SGD needs"):
            mgr.restore({"model": live, "opt": sgd})
        assert all(torch.equal(a, b) for a, b in zip(before, live.parameters()))  # nothing landed
        assert sgd.param_groups[0]["momentum"] == 0 and not sgd.state
        again = torch.optim.AdamW(live.parameters(), lr=1e-3)  # the same kind of groups: loads
        assert mgr.restore({"model": live, "opt": again}) == 10 and again.state
