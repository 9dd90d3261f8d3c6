"""CheckpointManager with s3_uri: wait() means "in S3", and each upload prints its metric line."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotckpt import CheckpointManager
from spotckpt.remote.s3 import S3Store
from tests.helpers import assert_state_is_step, empty_state, step_state

# Every S3 test here runs against moto and a real server (SeaweedFS); see tests/conftest.py.
S3_SERVERS = ("moto", "seaweedfs")


def test_wait_means_in_s3_and_upload_metric_line(tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{bucket}/job"
    with CheckpointManager(tmp_path / "a", uri, keep_last=2, metrics=True) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, step_state(s, numel=4096))
            assert mgr.wait()
            assert s in S3Store(uri).list_steps()
        assert mgr.stats.uploads >= 1 and mgr.stats.last_durable_s3_s is not None
    err = capsys.readouterr().err
    assert "spotckpt event=durable_s3 step=3 seconds=" in err and "since_save_s=" in err
    assert S3Store(uri).list_steps() == [2, 3]  # S3 retention follows keep_last
    target = empty_state(numel=4096)
    with CheckpointManager(tmp_path / "fresh", uri, metrics=False) as mgr:  # a new machine
        assert mgr.restore(target) == 3
    assert_state_is_step(target, 3, numel=4096)


@pytest.mark.parametrize("s3_server", ["moto"], indirect=True)  # the figures are measured, not checked by S3
def test_autopilot_grace_budget_and_restart_history(tmp_path: Path, bucket: str) -> None:
    """every_steps="auto" against a real S3 endpoint: the grace budget is the measured write plus
    the step's bytes at the measured upload throughput; the manifests carry the restart history,
    and the next instance learns whether the previous one ended with a final save."""
    from spotckpt.autopilot import read_step_extra

    uri = f"s3://{bucket}/auto"
    seen: list = []
    with CheckpointManager(tmp_path / "a", uri, every_steps="auto", metrics=False, install_signal_handlers=False,
                           grace_seconds=60.0) as mgr:
        mgr.events.subscribe(seen.append)
        for s in (1, 2, 3):
            mgr.save(s, step_state(s, numel=1 << 16))
            assert mgr.wait()
        st = mgr.stats
        ups = [e for e in seen if e.name == "durable_s3"]
        writes = [e.seconds for e in seen if e.name == "durable_local"][1:]  # the first save is dropped
        low_bps = min(e.bytes / e.seconds for e in ups[1:])
        assert st.grace_s == 60.0 and st.grace_fits is True
        assert st.grace_need_s == pytest.approx(max(writes) + ups[-1].bytes / low_bps)
        assert mgr.save_policy.interval_s is not None  # planned from the measurements
        mgr.watcher.request("test")  # a noticed interruption: the final save says so
        mgr.maybe_save(4, step_state(4, numel=1 << 16))
        assert mgr.preempted
    extra = read_step_extra(tmp_path / "a" / "step-000000000004")
    assert extra["final_save"] is True and extra["autopilot"]["instances"][-1][2] == 1
    with CheckpointManager(tmp_path / "b", uri, every_steps="auto", metrics=False,
                           install_signal_handlers=False) as mgr:  # a new instance
        assert mgr.restore(empty_state(numel=1 << 16)) == 4
        assert mgr.save_policy.interval_s is not None  # costs recorded by the last run: no probe needed
        mgr.save(5, step_state(5, numel=1 << 16))
        assert mgr.wait()
    rows = read_step_extra(tmp_path / "b" / "step-000000000005")["autopilot"]["instances"]
    assert [r[2] for r in rows] == [1, None] and "final_save" not in read_step_extra(tmp_path / "b" / "step-000000000005")
