"""spotckpt.dcp in one process (DCP without a process group): dcp.save/dcp.load through the
storage layer give a committed, verified step with no pickle; bad input gets a clear error and
never costs the last good step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, wrapping ours

import spotckpt
from spotckpt.dcp import StorageReader, StorageWriter
from spotckpt.errors import ConfigError
from spotckpt.format import step_dirname


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def _mgr(path: Path) -> spotckpt.CheckpointManager:
    return spotckpt.CheckpointManager(path, metrics=False, keep_last=None, install_signal_handlers=False)


def _save(mgr: spotckpt.CheckpointManager, step: int, seed: int) -> dict:  # type: ignore[type-arg]
    sd = {"model": _model(seed).state_dict(), "meta": {"step": step, "lr": [0.1, 0.01], "name": "run"}}
    dcp.save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=step)
    return sd


def _load(mgr: spotckpt.CheckpointManager, **kw: object) -> tuple[dict, StorageReader]:  # type: ignore[type-arg]
    sd = {"model": _model(99).state_dict(), "meta": {"step": 0, "lr": [0.0, 0.0], "name": ""}}
    reader = StorageReader(mgr, **kw)  # type: ignore[arg-type]
    dcp.load(sd, storage_reader=reader)
    return sd, reader


def test_save_commits_a_verified_pickle_free_step_and_load_restores_it(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr:
        saved = _save(mgr, 5, 1)
        assert mgr.all_steps() == [5]
        m = mgr.local.read_manifest(5)
        assert m.extra["layout"] == "dcp" and sorted(m.files) == ["rank-00000.safetensors", "rank-00000.tree.json"]
        assert mgr.local.verify_step(5).ok
        got, reader = _load(mgr)
    assert reader.loaded_step == 5
    assert got["meta"] == {"step": 5, "lr": [0.1, 0.01], "name": "run"}
    for k, v in saved["model"].items():
        assert torch.equal(got["model"][k], v), k


def test_a_corrupt_newest_step_falls_back_to_the_older_one(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr:
        older = _save(mgr, 5, 1)
        _save(mgr, 6, 2)
        f = tmp_path / step_dirname(6) / "rank-00000.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x10
        f.write_bytes(bytes(data))
        got, reader = _load(mgr)
    assert reader.loaded_step == 5
    assert torch.equal(got["model"]["0.weight"], older["model"]["0.weight"])


def test_checkpoint_ids_name_steps(tmp_path: Path) -> None:
    ok = [7, "7", step_dirname(7), str(tmp_path / step_dirname(7))]
    assert all(StorageWriter.validate_checkpoint_id(c) for c in ok)  # type: ignore[arg-type]
    assert not StorageWriter.validate_checkpoint_id("latest")
    with _mgr(tmp_path) as mgr:
        w = StorageWriter(mgr)
        w.reset(str(tmp_path / step_dirname(7)))
        assert w.step == 7
        with pytest.raises(CheckpointException, match="checkpoint_id=step"):
            dcp.save({"x": torch.zeros(2)}, storage_writer=StorageWriter(mgr))
        assert mgr.all_steps() == []


def test_a_value_json_cannot_hold_is_refused_and_nothing_is_committed(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr:
        _save(mgr, 1, 1)
        with pytest.raises(CheckpointException, match=r"meta.fn: value of type builtins.builtin_function_or_method cannot be checkpointed"):
            dcp.save({"x": torch.zeros(2), "meta": {"fn": print}}, storage_writer=StorageWriter(mgr), checkpoint_id=2)
        assert mgr.all_steps() == [1]


def test_the_manager_points_a_dcp_step_to_the_reader_and_the_reader_a_manager_step_to_restore(tmp_path: Path) -> None:
    with _mgr(tmp_path / "a") as mgr:
        _save(mgr, 3, 1)
        with pytest.raises(ConfigError, match=r"storage_reader=spotckpt.dcp.StorageReader"):
            mgr.restore({"model": _model(2)})
    with _mgr(tmp_path / "b") as mgr:
        mgr.save(4, {"model": _model(2)}, blocking=True)
        with pytest.raises(CheckpointException, match=r"CheckpointManager.restore\(state\)"):
            _load(mgr)


def test_no_checkpoint_says_to_start_fresh(tmp_path: Path) -> None:
    with _mgr(tmp_path) as mgr, pytest.raises(CheckpointException, match="start fresh instead of calling dcp.load"):
        _load(mgr)


def test_a_committed_step_is_never_rewritten(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with _mgr(tmp_path) as mgr:
        first = _save(mgr, 2, 1)
        with caplog.at_level("WARNING", logger="spotckpt.dcp"):
            _save(mgr, 2, 5)  # a no-op, with a warning naming the step and the rule
        got, _ = _load(mgr)
    assert torch.equal(got["model"]["0.weight"], first["model"]["0.weight"])
    [rec] = [r for r in caplog.records if r.name == "spotckpt.dcp"]
    assert rec.levelname == "WARNING" and "step 2 is already committed" in rec.getMessage()
    assert "never replaced" in rec.getMessage() and "increasing checkpoint_id" in rec.getMessage()


def test_the_writer_waits_for_the_managers_pending_async_save(tmp_path: Path) -> None:
    """The DCP writer's commit shares the persist thread's collectives: it starts only once the
    manager's own async save has finished."""
    import threading

    with _mgr(tmp_path) as mgr:
        gate = threading.Event()
        original = mgr.pipeline.write_files  # hold the async save on the persist thread until released

        def slow_write(*args: object, **kw: object) -> object:
            if threading.current_thread().name == "spotckpt-persist":
                gate.wait()
            return original(*args, **kw)  # type: ignore[arg-type]

        mgr.pipeline.write_files = slow_write  # type: ignore[method-assign]
        mgr.save(1, {"w": torch.ones(2)}, blocking=False)
        done = threading.Event()
        t = threading.Thread(target=lambda: (_save(mgr, 2, 1), done.set()))
        try:
            t.start()
            assert not done.wait(0.3)  # still waiting for step 1's persist
            assert mgr.all_steps() == []
        finally:
            gate.set()
            t.join()
        assert done.is_set() and mgr.all_steps() == [1, 2]


def test_a_saved_dtype_is_cast_into_the_live_one_as_dcp_does(tmp_path: Path) -> None:
    """DCP's FileSystemReader copies with Tensor.copy_, which casts: fp32 into a bf16 model."""
    with _mgr(tmp_path) as mgr:
        saved = _save(mgr, 1, 1)
        sd = {"model": {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in saved["model"].items()}}
        dcp.load(sd, storage_reader=StorageReader(mgr))
    for k, v in saved["model"].items():
        assert sd["model"][k].dtype == torch.bfloat16 and torch.equal(sd["model"][k], v.to(torch.bfloat16)), k


def test_a_refused_load_changes_nothing_not_even_what_it_read_first(tmp_path: Path) -> None:
    """The whole plan is checked before the first copy: a value that cannot be loaded (here a
    pickle, refused) leaves the tensors planned before it untouched."""
    with spotckpt.CheckpointManager(tmp_path, metrics=False, install_signal_handlers=False, allow_pickle=True) as mgr:
        dcp.save({"a": torch.ones(3), "b": {"c": torch.full((2,), 2.0)}, "z": {"fn": print}},
                 storage_writer=StorageWriter(mgr), checkpoint_id=1)
    sd = {"a": torch.zeros(3), "b": {"c": torch.zeros(2, dtype=torch.bfloat16)}, "z": {"fn": None}}
    with _mgr(tmp_path) as mgr, pytest.raises(CheckpointException, match="pickled value"):
        dcp.load(sd, storage_reader=StorageReader(mgr))
    assert torch.equal(sd["a"], torch.zeros(3)) and torch.equal(sd["b"]["c"], torch.zeros(2, dtype=torch.bfloat16))
    assert sd["z"] == {"fn": None}


def test_partial_and_key_based_loads_get_the_nested_dict_back(tmp_path: Path) -> None:
    """DCP's planner hands the writer its flat-key -> path mapping (planner_data); it is kept
    as JSON in the rank's tree file and given back by read_metadata, as DCP's own storage does."""
    import json

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with _mgr(tmp_path) as mgr:
        saved = _save(mgr, 3, 1)
        tree = json.loads((tmp_path / step_dirname(3) / "rank-00000.tree.json").read_bytes())
        assert tree["planner_data"]["model.0.weight"] == ["model", "0.weight"]
        assert tree["planner_data"]["meta.lr"] == ["meta", "lr"]
        everything = _load_state_dict_from_keys(storage_reader=StorageReader(mgr))
        model = _load_state_dict_from_keys("model", storage_reader=StorageReader(mgr))
        one = _load_state_dict_from_keys({"model.2.bias", "meta.name"}, storage_reader=StorageReader(mgr))
    assert sorted(everything) == ["meta", "model"] and everything["meta"] == saved["meta"]
    assert sorted(everything["model"]) == sorted(saved["model"])
    assert sorted(model) == ["model"] and all(torch.equal(model["model"][k], v) for k, v in saved["model"].items())
    assert one == {"model": {"2.bias": one["model"]["2.bias"]}, "meta": {"name": "run"}}
    assert torch.equal(one["model"]["2.bias"], saved["model"]["2.bias"])
