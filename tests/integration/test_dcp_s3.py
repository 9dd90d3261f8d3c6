"""spotckpt.dcp loading a step that is only in S3 (one process, moto): the chunks the plan reads
are fetched as ranged reads, each checked against the CRC32C its writer recorded in the
(manifest-verified) tree, and nothing from a chunk that does not verify reaches a live tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, wrapping ours

import spotckpt
from spotckpt.core.layouts import CHUNK_CRCS
from spotckpt.dcp import StorageReader, StorageWriter
from spotckpt.format import step_dirname


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def _mgr(path: Path, uri: str) -> spotckpt.CheckpointManager:
    return spotckpt.CheckpointManager(path, uri, metrics=False, keep_last=None, install_signal_handlers=False)


def _saved(tmp_path: Path, uri: str, steps: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Steps ``{step: seed}`` saved through DCP and uploaded; returns what each holds."""
    out = {}
    with _mgr(tmp_path / "src", uri) as mgr:
        for step, seed in steps.items():
            sd = {"model": _model(seed).state_dict(), "meta": {"step": step}}
            dcp.save(sd, storage_writer=StorageWriter(mgr), checkpoint_id=step)
            out[step] = sd
        assert mgr.wait()
    return out


def _flip_byte_in_s3(bucket: str, key: str, at: int) -> None:
    s3 = boto3.client("s3")
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[at] ^= 0x10
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))


def _fresh() -> dict[str, Any]:
    return {"model": _model(99).state_dict(), "meta": {"step": 0}}


def test_a_step_only_in_s3_loads_chunk_by_verified_chunk_without_downloading_it(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/dcp"
    saved = _saved(tmp_path, uri, {5: 1})
    man = json.loads(boto3.client("s3").get_object(Bucket=bucket, Key=f"dcp/{step_dirname(5)}/manifest.json")
                     ["Body"].read())
    assert man[CHUNK_CRCS] is True
    tree = json.loads((tmp_path / "src" / step_dirname(5) / "rank-00000.tree.json").read_bytes())
    assert set(tree["shards"]) == {f"model.{k}" for k in saved[5]["model"]} and all("crc32c" in e for e in tree["shards"].values())
    got = _fresh()
    with _mgr(tmp_path / "new", uri) as mgr:  # a new machine
        reader = StorageReader(mgr)
        dcp.load(got, storage_reader=reader)
    assert reader.loaded_step == 5 and got["meta"] == {"step": 5}
    for k, v in saved[5]["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert not (tmp_path / "new" / step_dirname(5)).exists()  # read from S3, not downloaded and committed


def _assert_loads_step_5(tmp_path: Path, uri: str, saved: dict) -> None:
    """A fresh manager's DCP load falls back to step 5, whose values land whole."""
    got = _fresh()
    with _mgr(tmp_path / "new", uri) as mgr:
        reader = StorageReader(mgr)
        dcp.load(got, storage_reader=reader)
    assert reader.loaded_step == 5
    for k, v in saved[5]["model"].items():
        assert torch.equal(got["model"][k], v), k


def test_a_corrupt_chunk_in_s3_moves_the_load_to_the_older_step(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/dcp"
    saved = _saved(tmp_path, uri, {5: 1, 6: 2})
    tree = json.loads((tmp_path / "src" / step_dirname(6) / "rank-00000.tree.json").read_bytes())
    start, _ = tree["shards"]["model.2.weight"]["bytes"]
    _flip_byte_in_s3(bucket, f"dcp/{step_dirname(6)}/rank-00000.safetensors", start + 3)
    _assert_loads_step_5(tmp_path, uri, saved)


def test_a_data_object_missing_in_s3_moves_the_load_to_the_older_step(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/dcp"
    saved = _saved(tmp_path, uri, {5: 1, 6: 2})
    boto3.client("s3").delete_object(Bucket=bucket, Key=f"dcp/{step_dirname(6)}/rank-00000.safetensors")
    _assert_loads_step_5(tmp_path, uri, saved)


class _CorruptedAfterMetadata(StorageReader):
    """Damage appears in S3 after read_metadata fetched the chunks: read_data fetches them
    again (as it does for chunks of other ranks' files) and must refuse before any copy."""

    bucket = ""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        md = super().read_metadata(*args, **kwargs)
        assert self._index is not None
        self._index.release()
        _flip_byte_in_s3(self.bucket, f"dcp/{step_dirname(5)}/rank-00000.safetensors", -5)
        return md


def test_a_chunk_that_fails_its_check_in_read_data_leaves_every_live_tensor_untouched(tmp_path: Path,
                                                                                       bucket: str) -> None:
    uri = f"s3://{bucket}/dcp"
    _saved(tmp_path, uri, {5: 1})
    got = _fresh()
    before = {k: v.clone() for k, v in got["model"].items()}
    with _mgr(tmp_path / "new", uri) as mgr:
        reader = _CorruptedAfterMetadata(mgr)
        reader.bucket = bucket
        with pytest.raises(CheckpointException, match="nothing was loaded"):
            dcp.load(got, storage_reader=reader)
    assert got["meta"] == {"step": 0}
    for k, v in before.items():
        assert torch.equal(got["model"][k], v), k
