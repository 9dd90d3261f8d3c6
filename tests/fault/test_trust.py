"""The trust contract: one meaning of "committed", all bad is not none, restore is all or
nothing, state errors come at restore(), hands off the training's RNGs, a failing request
listener is loud. Each test reproduces a way progress was silently lost before."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spotckpt import AllStepsCorruptError, CheckpointManager, CollectiveError, StateError
from spotckpt.core.local import LocalStore
from spotckpt.remote.s3 import S3Store, make_client
from tests.fault.test_s3_faults import SMALL_PARTS, FaultInjector

KW = {"metrics": False, "keep_last": 2}


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _state(width: int = 8) -> dict[str, object]:
    torch.manual_seed(width)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return {"model": model, "optim": opt, "scale": torch.ones(3), "epoch": 7}


def test_a_step_dir_without_manifest_never_swallows_the_final_save(tmp_path: Path) -> None:
    """A partial sync left step-30 without manifest.json: it is not a resume point, and the
    SIGTERM save of step 30 moves it aside and commits instead of being a silent no-op."""
    st = _state()
    with CheckpointManager(tmp_path, every_steps=10, async_save=False, **KW) as mgr:
        for step in (10, 20):
            mgr.save(step, st)
    partial = tmp_path / "step-000000000030"
    partial.mkdir()
    (partial / "rank-00000.safetensors").write_bytes(b"partial")
    with CheckpointManager(tmp_path, every_steps=10, async_save=False, **KW) as mgr:
        assert mgr.all_steps() == [10, 20] and mgr.latest_step() == 20  # incomplete: not counted
        assert mgr.restore(st) == 20
        for step in range(21, 31):
            if step == 30:
                os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the manager
            assert mgr.maybe_save(step, st) == (step == 30)
            if mgr.preempted:
                break
        assert mgr.preempted and mgr.latest_step() == 30
    assert LocalStore(tmp_path).verify_step(30).ok
    st["epoch"] = 0
    with CheckpointManager(tmp_path, **KW) as mgr:
        assert mgr.restore(st) == 30 and st["epoch"] == 7


def test_every_step_corrupt_raises_naming_each_and_deletes_nothing(tmp_path: Path) -> None:
    st = _state()
    with CheckpointManager(tmp_path, async_save=False, keep_last=3, metrics=False) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, st)
    for step in (1, 2):
        _flip(tmp_path / f"step-00000000000{step}" / "rank-00000.safetensors")
    (tmp_path / "step-000000000003" / "manifest.json").write_text("{not json")  # damaged manifest
    with CheckpointManager(tmp_path, async_save=False, keep_last=3, metrics=False) as mgr:
        assert mgr.all_steps() == [1, 2]  # the damaged manifest un-commits step 3
        with pytest.raises(AllStepsCorruptError) as info:
            mgr.restore(st)
        assert sorted(info.value.problems) == [1, 2, 3]
        msg = str(info.value)
        assert "none verifies" in msg and "start_fresh_if_corrupt=True" in msg and "CRC32C" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step-00000000000{s}" for s in (1, 2, 3)]


def test_starting_fresh_over_corrupt_steps_is_an_explicit_choice(tmp_path: Path) -> None:
    st = _state()
    with CheckpointManager(tmp_path, async_save=False, keep_last=3, metrics=False) as mgr:
        for step in (10, 20):
            mgr.save(step, st)
    for step in (10, 20):
        _flip(tmp_path / f"step-0000000000{step}" / "rank-00000.safetensors")
    with CheckpointManager(tmp_path, async_save=False, keep_last=3, metrics=False) as mgr:
        assert mgr.restore(st, start_fresh_if_corrupt=True) is None
        assert mgr.all_steps() == []  # moved aside (kept as evidence), not counted
        mgr.save(10, st)  # the new run's step 10 is really written
        assert mgr.all_steps() == [10] and mgr.local.verify_step(10).ok
    kept = [p.name for p in mgr.local.staging_root.iterdir() if "quarantine" in p.name]
    assert len(kept) == 1 and kept[0].endswith("step-000000000020")  # 10 was replaced by a good 10


def test_a_restore_that_does_not_fit_changes_nothing(tmp_path: Path) -> None:
    """A model of another width: StateError before the first byte or value lands -- epoch,
    tensors, module and optimizer keep their values (the optimizer's state is checked too)."""
    with CheckpointManager(tmp_path, async_save=False, **KW) as mgr:
        mgr.save(5, _state(8))
    st = _state(16)
    st["epoch"] = 0
    st["scale"] = torch.full((3,), 2.0)
    before = {k: v.clone() for k, v in st["model"].state_dict().items()}  # type: ignore[union-attr]
    opt_before = {k: {n: t.clone() for n, t in v.items()} for k, v in st["optim"].state.items()}  # type: ignore[union-attr]
    with CheckpointManager(tmp_path, **KW) as mgr:
        with pytest.raises(StateError, match=r"model: .*shapes differ.*nothing was loaded"):
            mgr.restore(st)
    assert st["epoch"] == 0 and torch.equal(st["scale"], torch.full((3,), 2.0))  # type: ignore[arg-type]
    for k, v in st["model"].state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(v, before[k]), k
    for p, s in st["optim"].state.items():  # type: ignore[union-attr]
        for n, t in s.items():
            assert torch.equal(t, opt_before[p][n])
    # the optimizer alone over parameters of another shape: refused before anything lands too
    only_opt = {"optim": _state(16)["optim"], "epoch": 0}
    with CheckpointManager(tmp_path, **KW) as mgr:
        with pytest.raises(StateError, match=r"optim: state 'exp_avg' of parameter 0 is \[8, 4\].*\[16, 4\]"):
            mgr.restore(only_opt)
    assert only_opt["epoch"] == 0


def test_a_plain_dataloader_is_refused_at_restore_naming_the_fix(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(list(range(10)), batch_size=2)
    with CheckpointManager(tmp_path, **KW) as mgr:
        with pytest.raises(StateError, match="ResumableDataLoader") as info:
            mgr.restore({"loader": loader})  # before: accepted here, refused 500 steps later
        assert info.value.key_path == "loader"
        with pytest.raises(StateError, match="ResumableDataLoader"):
            mgr.save(1, {"loader": loader})


def _draws(n: int) -> list[float]:
    return [random.random(), float(np.random.rand()), float(torch.rand(1))] * n


def test_s3_retries_never_touch_the_trainings_rngs(tmp_path: Path, bucket: str) -> None:
    """A loop that draws from random, numpy and torch every step, saving to S3 through 503s
    (botocore's retries and spotckpt's own): the same numbers as without spotckpt."""
    def run(with_s3: bool) -> list[float]:
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(0)
        out: list[float] = []
        if not with_s3:
            for _ in range(30):
                out += _draws(1)
            return out + _draws(5)
        faults = FaultInjector(0.2, seed=3)
        client = make_client()
        client.meta.events.register("before-send.s3", faults)
        store = S3Store(f"s3://{bucket}/rng", client=client, transfer_config=SMALL_PARTS,
                        retry_attempts=8, retry_backoff_seconds=0.01)
        st = {"w": torch.zeros(3 << 20)}  # 12 MiB: multipart, several requests per save
        with CheckpointManager(tmp_path / "c", remote_store=store, every_steps=10, keep_last=2, metrics=False) as mgr:
            for step in range(1, 31):
                out += _draws(1)
                mgr.maybe_save(step, st)
            mgr.wait()
        assert sum(faults.injected.values()) > 0, faults.injected
        return out + _draws(5)

    assert run(True) == run(False)


def test_the_request_listener_failing_is_raised_not_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    import torch.distributed as dist

    from spotckpt.ranks.dist import RequestChannel

    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    ch = RequestChannel(store, 0, 1, prefix="spotckpt/")
    assert ch.pending() is None
    with caplog.at_level(logging.ERROR, logger="spotckpt.ranks.dist"):
        dist.PrefixStore("spotckpt/", store).set("req/0", b"{not json")  # a broken or foreign store
        ch._thread.join(timeout=30)
    assert not ch._thread.is_alive()
    assert "save-request listener stopped" in caplog.text
    with pytest.raises(CollectiveError, match="listener stopped"):
        ch.pending()
    ch.close()
