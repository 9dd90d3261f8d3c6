"""CUDA staging: pinned host buffers, side-stream copies ordered against the training stream,
restore into device tensors. Skipped without CUDA (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotckpt import CheckpointManager

pytestmark = pytest.mark.gpu


def test_async_save_uses_pinned_buffer_and_round_trips(tmp_path: Path) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    st = {"w": torch.randn(1 << 20, device="cuda", generator=g, dtype=torch.bfloat16),
          "b": torch.randn(17, device="cuda", generator=g), "cpu": torch.arange(5.0)}
    want = {k: v.clone() for k, v in st.items()}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(1, st)
        assert mgr.pipeline.stager._buf is not None and mgr.pipeline.stager._buf.is_pinned()
        mgr.wait()
    target = {k: torch.zeros_like(v) for k, v in st.items()}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(target) == 1
    for k in st:
        assert target[k].device == want[k].device and torch.equal(target[k], want[k]), k


def test_copy_sees_queued_work_and_later_work_waits_for_copy(tmp_path: Path) -> None:
    p = torch.zeros(32 << 20, device="cuda")  # 128 MiB: the copy takes a while
    for _ in range(50):
        p.add_(1.0)  # queued, not yet run when save() is called
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(1, {"p": p})  # returns without synchronising the device
        p.add_(1000.0)  # an "optimizer step" right after save(): must not leak into step 1
        mgr.wait()
    torch.cuda.synchronize()
    assert float(p[0]) == 1050.0
    target = {"p": torch.empty_like(p)}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.restore(target)
    assert torch.all(target["p"] == 50.0)


def test_module_on_gpu_restores_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(3, {"model": m, "optim": opt})
    m2 = torch.nn.Linear(64, 64).cuda()
    opt2 = torch.optim.AdamW(m2.parameters())
    ptr = m2.weight.data_ptr()
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore({"model": m2, "optim": opt2}) == 3
    assert m2.weight.data_ptr() == ptr
    assert torch.equal(m2.weight, m.weight) and torch.equal(m2.bias, m.bias)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and s2["exp_avg"].device.type == "cuda"


def test_blocking_save_of_device_tensors_goes_through_pinned_staging(tmp_path: Path) -> None:
    st = {"w": torch.arange(1 << 20, device="cuda", dtype=torch.float32)}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        mgr.save(5, st, blocking=True)
        assert mgr.all_steps() == [5]
        assert mgr.pipeline.stager._buf is not None and mgr.pipeline.stager._buf.is_pinned() and not mgr.pipeline.stager.in_use
    target = {"w": torch.zeros_like(st["w"])}
    with CheckpointManager(tmp_path, metrics=False) as mgr:
        assert mgr.restore(target) == 5
    assert torch.equal(target["w"], st["w"])
