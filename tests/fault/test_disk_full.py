"""A real full disk: a small tmpfs mounted for the test (skipped where mounting is not allowed).

The one test of a disk that fills up during a save -- blocking (raised at once) and async (a
failure on the persist thread, raised from the next wait()/save()) -- with no patched writer."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotckpt import CheckpointManager
from spotckpt.errors import SaveError
from tests.helpers import assert_all_steps_verify, assert_state_is_step, empty_state, step_state


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("blocking", [True, False])
def test_enospc_keeps_earlier_checkpoints(small_disk: Path, blocking: bool) -> None:
    d = small_disk / "ckpt"
    small = 64 * 1024  # 4 x 256 KiB = 1 MiB
    with CheckpointManager(d, keep_last=3, metrics=False) as mgr:
        mgr.save(1, step_state(1, numel=small), blocking=True)
        with pytest.raises(SaveError, match="disk is full") as ei:
            mgr.save(2, step_state(2, numel=4 * small), blocking=blocking)  # 4 MiB: does not fit
            mgr.wait()
        assert ei.value.step == 2  # async or not: the same error, naming the step
        assert mgr.all_steps() == [1]
        assert os.listdir(mgr.local.staging_root) == []  # the partial save is gone
        mgr.save(3, step_state(3, numel=small), blocking=True)  # space is back: saving works again
    assert assert_all_steps_verify(d) == [1, 3]
    target = empty_state(numel=small)
    with CheckpointManager(d, metrics=False) as mgr:
        assert mgr.restore(target) == 3
    assert_state_is_step(target, 3, numel=small)
