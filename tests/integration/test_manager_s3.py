"""CheckpointManager with s3_uri: wait() means "in S3", and each upload prints its metric line."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotckpt import CheckpointManager
from spotckpt.s3 import S3Store
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
