"""The resharding read (spotckpt.ranks.shard): saved chunks found through the safetensors headers,
planned by DCP's load planner, checked (sizes, full coverage) before a byte lands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spotckpt.errors import CheckpointCorruptError, StateError
from spotckpt.format import SafetensorsFile, write_safetensors
from spotckpt.ranks.shard import SHARDS_KEY, ShardIndex, ShardInfo, load_boxes, shards_metadata

FULL = torch.arange(24, dtype=torch.float32).reshape(6, 4)


def _file(path: Path, chunks: dict[str, tuple[torch.Tensor, ShardInfo]]) -> SafetensorsFile:
    write_safetensors(path, {k: t for k, (t, _) in chunks.items()}, shards_metadata({k: i for k, (_, i) in chunks.items()}))
    return SafetensorsFile(path)


def _rows(a: int, b: int) -> tuple[torch.Tensor, ShardInfo]:
    return FULL[a:b].clone(), ShardInfo((6, 4), (a, 0))


def test_chunks_of_two_files_fill_a_full_tensor_and_a_narrower_shard(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": _rows(0, 4)}) as a, _file(tmp_path / "b", {"w": _rows(4, 6)}) as b:
        index = ShardIndex({"a": a, "b": b})
        full = torch.zeros(6, 4)
        assert load_boxes({"w": full}, index) == 24 * 4
        assert torch.equal(full, FULL)


def test_a_box_across_columns_reads_only_its_part(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": (FULL.clone(), ShardInfo((6, 4), (0, 0)))}) as a:
        out = torch.zeros(3, 2)
        a.read_box_into("w", (2, 1), (3, 2), out)
        assert torch.equal(out, FULL[2:5, 1:3])
        col = torch.zeros(2, 6).t()  # a non-contiguous target
        a.read_box_into("w", (0, 2), (6, 2), col)
        assert torch.equal(col, FULL[:, 2:4])


def test_shards_that_do_not_cover_a_tensor_are_refused_before_any_byte_lands(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": _rows(0, 4)}) as a:
        target = torch.full((6, 4), -1.0)
        with pytest.raises(CheckpointCorruptError, match=r"'w' cover 16 of the 24"):
            load_boxes({"w": target}, ShardIndex({"a": a}))
        assert (target == -1).all()


def test_a_live_tensor_of_another_shape_is_refused_naming_it(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": _rows(0, 6)}) as a:
        target = torch.full((7, 4), -1.0)
        with pytest.raises(StateError, match=r"^w: saved as torch.float32\[6, 4\], the live tensor is torch.float32\[7, 4\]"):
            load_boxes({"w": target}, ShardIndex({"a": a}))
        assert (target == -1).all()


def test_a_tensor_missing_from_the_shards_is_an_incomplete_checkpoint(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": _rows(0, 6)}) as a:
        with pytest.raises(CheckpointCorruptError, match="no saved shard of 'v'"):
            load_boxes({"v": torch.zeros(2)}, ShardIndex({"a": a}))


@pytest.mark.parametrize("header", [
    '{"w": {"size": [6, 4], "offsets": [4, 0]}}',       # 4 rows at offset 4 overrun 6
    '{"w": {"size": [6], "offsets": [0]}}',             # rank disagrees with the stored tensor
    '{"w": {"size": "6x4", "offsets": [0, 0]}}',
    '[1, 2]',
    '{"nope": {"size": [6, 4], "offsets": [0, 0]}}',    # names a tensor the file lacks
])
def test_a_malformed_sharding_header_is_corruption(tmp_path: Path, header: str) -> None:
    write_safetensors(tmp_path / "a", {"w": FULL[:4].clone()}, {SHARDS_KEY: header})
    with SafetensorsFile(tmp_path / "a") as a, pytest.raises(CheckpointCorruptError, match=SHARDS_KEY):
        ShardIndex({"a": a})


def test_files_that_disagree_on_a_tensor_size_are_corruption(tmp_path: Path) -> None:
    other = (FULL[4:6].clone(), ShardInfo((8, 4), (4, 0)))
    with _file(tmp_path / "a", {"w": _rows(0, 4)}) as a, _file(tmp_path / "b", {"w": other}) as b:
        with pytest.raises(CheckpointCorruptError, match="another file"):
            ShardIndex({"a": a, "b": b})


def test_sharding_header_is_plain_json(tmp_path: Path) -> None:
    with _file(tmp_path / "a", {"w": _rows(2, 4)}) as a:
        assert json.loads(a.metadata[SHARDS_KEY]) == {"w": {"size": [6, 4], "offsets": [2, 0]}}


def test_the_first_save_imports_nothing_on_the_training_thread(tmp_path: Path) -> None:
    """A state can hold a DTensor only once its module is imported: the first save of a fresh
    process must not import torch.distributed.tensor (it made the first save's stall ~1 s for a
    256 KB state) -- nor any other module: whatever a first save imports, a preemption before
    the first periodic save pays inside the grace. A module, its optimizer, the RNGs and a plain
    tensor, so every kind of value goes through the save once."""
    code = (
        "import sys, torch, spotckpt\n"
        "def first_save(d, state):\n"
        "    with spotckpt.CheckpointManager(d, install_signal_handlers=False) as mgr:\n"
        "        before = set(sys.modules)\n"
        "        mgr.save(1, state)\n"
        "        mgr.wait()\n"
        "        return sorted(set(sys.modules) - before)\n"
        f"new = first_save({str(tmp_path / 'a')!r}, {{'w': torch.zeros(64 * 1024), 'epoch': 0}})\n"
        "print('TENSORS', new, 'DTENSOR', 'torch.distributed.tensor' in sys.modules)\n"
        "m = torch.nn.Linear(64, 64)\n"
        "opt = torch.optim.AdamW(m.parameters())\n"
        "m(torch.randn(2, 64)).sum().backward()\n"
        "opt.step()\n"
        f"new = first_save({str(tmp_path / 'b')!r}, {{'model': m, 'optim': opt, 'rng': spotckpt.RNGState()}})\n"
        "print('STATEFUL', new)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "TENSORS [] DTENSOR False" in out, out
    assert "STATEFUL []" in out, out
