"""Sharded state (FSDP2 on gloo, several processes): saved by one number of ranks, restored by
another (4 -> 2, 2 -> 4, 4 -> 1 onto a plain module) with every full tensor equal; a corrupted
shard falls back to the older step; a model that cannot hold the saved shapes is refused before
any live tensor changes; DCP's own save/load through spotckpt's storage layer, uploaded to S3;
and behaving like DCP's own storage (ShardedTensors resharded, dtype casts, loads by key, a refused
load changing nothing on any rank)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spotckpt.format import MANIFEST_NAME, step_dirname
from spotckpt.core.local import LocalStore
from spotckpt.remote.s3 import S3Store
from tests.helpers import REPO, finish_ranks, launch_ranks, result_of

pytestmark = pytest.mark.ranks

CHILD = str(Path(__file__).with_name("fsdp_child.py"))
DCP_CHILD = str(Path(__file__).with_name("dcp_child.py"))


def _run(world: int, scenario: str, local_dir: Path, out: Path, *args: str,
         env: dict[str, str] | None = None, child: str = CHILD) -> list[dict]:  # type: ignore[type-arg]
    """``world`` ranks (0: one process, no process group) of ``child`` (fsdp_child.py); their results."""
    if world == 0:
        import subprocess

        e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        e.update(env or {}, SPOTCKPT_METRICS="0")
        p = subprocess.run([sys.executable, child, scenario, str(local_dir), str(out), *args], env=e,
                           capture_output=True, text=True, cwd=REPO)
        results = [(p.returncode, p.stdout, p.stderr)]
    else:
        procs = launch_ranks(lambda r: [sys.executable, child, scenario, str(local_dir), str(out), *args], world,
                             env=env)
        results = finish_ranks(procs)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [result_of(o) for _, o, _ in results]


def _assert_same(saved: Path, restored: Path) -> None:
    a, b = load_file(saved), load_file(restored)
    assert sorted(a) == sorted(b) and len(a) == 17  # 4 params + 1 buffer, 3 optimizer tensors per param
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_saved_by_4_restored_by_2_and_by_1_plain(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _run(4, "save", ck, tmp_path / "saved.st", "3")
    m = LocalStore(ck, create=False, cleanup=False).read_manifest(3)
    assert m.extra["world_size"] == 4 and m.extra["sharded"] == ["model", "optim"]
    res = _run(2, "restore", ck, tmp_path / "r2.st")
    assert [r["step"] for r in res] == [3, 3] and res[0]["epoch"] == 3
    _assert_same(tmp_path / "saved.st", tmp_path / "r2.st")
    res = _run(0, "plain", ck, tmp_path / "r1.st")  # FSDP -> a plain module, e.g. for export
    assert res[0]["step"] == 3
    _assert_same(tmp_path / "saved.st", tmp_path / "r1.st")


def test_async_save_by_2_restored_by_4(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _run(2, "save", ck, tmp_path / "saved.st", "2", "async")
    res = _run(4, "restore", ck, tmp_path / "r4.st")
    assert {r["step"] for r in res} == {2}
    _assert_same(tmp_path / "saved.st", tmp_path / "r4.st")


def test_corrupt_shard_falls_back_to_the_older_step_on_every_rank(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _run(2, "save", ck, tmp_path / "saved2.st", "2")
    _run(2, "save", ck, tmp_path / "saved3.st", "3")
    shard = ck / step_dirname(3) / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a byte of rank 1's last shard
    shard.write_bytes(bytes(data))
    res = _run(2, "restore", ck, tmp_path / "r.st")
    assert [r["step"] for r in res] == [2, 2]
    _assert_same(tmp_path / "saved2.st", tmp_path / "r.st")


def test_a_model_that_cannot_hold_the_saved_shapes_is_refused_untouched(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    _run(2, "save", ck, tmp_path / "saved.st", "1")
    res = _run(2, "mismatch", ck, tmp_path / "m.st")
    for r in res:
        assert r["error"] == "StateError", r
        assert r["message"].startswith("model/0.bias: saved as torch.float32[13]"), r["message"]
        assert r["untouched"] is True


def test_dcp_save_through_spotckpt_commits_uploads_and_loads_resharded_from_s3(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/dcp"
    env = {"S3_URI": uri}
    res = _run(2, "dcp-save", tmp_path / "a", tmp_path / "saved.st", "4", "async", env=env)
    assert res[0]["steps"] == [4]
    local = LocalStore(tmp_path / "a", create=False, cleanup=False)
    m = local.read_manifest(4)
    assert m.extra["layout"] == "dcp" and m.extra["world_size"] == 2
    assert local.verify_step(4).ok
    assert not any(f.endswith(".metadata") or f.endswith(".distcp") for f in m.files)  # no pickles
    store = S3Store(uri)
    try:
        assert store.list_steps() == [4]
        assert store.missing_objects(4, m) == []  # every file in S3, right size and CRC32C
    finally:
        store.close()
    # a new machine, one process: fetched from S3, verified, resharded 2 -> 1 by DCP
    res = _run(0, "dcp-load", tmp_path / "b", tmp_path / "r1.st", env=env)
    assert res[0]["step"] == 4 and res[0]["train"] == {"step": 4, "note": "spot"}
    # read from S3 chunk by verified chunk (the step records each chunk's CRC32C), not downloaded whole
    assert not (tmp_path / "b" / step_dirname(4) / MANIFEST_NAME).exists()
    _assert_same(tmp_path / "saved.st", tmp_path / "r1.st")


def test_a_corrupt_chunk_in_s3_moves_a_two_rank_dcp_load_to_the_older_step_on_every_rank(tmp_path: Path,
                                                                                          bucket: str) -> None:
    """Each rank fetches and checks the chunks of its own file from S3 (no whole-step download):
    a flipped byte in rank 1's file of step 5 is seen by rank 1 alone, and both load step 4."""
    import boto3

    env = {"S3_URI": f"s3://{bucket}/dcp"}
    _run(2, "dcp-save", tmp_path / "a", tmp_path / "saved4.st", "4", env=env)
    _run(2, "dcp-save", tmp_path / "a", tmp_path / "saved5.st", "5", env=env)
    s3, key = boto3.client("s3"), f"dcp/{step_dirname(5)}/rank-00001.safetensors"
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-5] ^= 0xFF  # a byte of rank 1's last chunk
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    res = _run(2, "dcp-load", tmp_path / "b", tmp_path / "r.st", env=env)
    assert [r["step"] for r in res] == [4, 4]
    _assert_same(tmp_path / "saved4.st", tmp_path / "r.st")
    assert not (tmp_path / "b" / step_dirname(5)).exists() and not (tmp_path / "b" / step_dirname(4)).exists()


def test_resharding_from_s3_on_new_hosts_fetches_other_hosts_shards_as_verified_ranges(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/fsdp"
    env = {"S3_URI": uri}
    _run(4, "save", tmp_path / "old{rank}", tmp_path / "saved2.st", "2", env=env)
    _run(4, "save", tmp_path / "old{rank}", tmp_path / "saved3.st", "3", env=env)
    # 4 hosts -> 2 new, empty hosts: each fetches its own files, the other shards as byte ranges
    res = _run(2, "restore", tmp_path / "new{rank}", tmp_path / "r.st", env=env)
    assert [r["step"] for r in res] == [3, 3]
    _assert_same(tmp_path / "saved3.st", tmp_path / "r.st")
    for r in (0, 1):
        files = sorted(p.name for p in (tmp_path / f"new{r}" / step_dirname(3)).iterdir())
        assert files == [MANIFEST_NAME, f"rank-0000{r}.safetensors", f"rank-0000{r}.tree.json"]

    # a shard altered in S3 after it was verified there: its range fails its CRC32C on every
    # rank that reads it, and every rank falls back to step 2
    store = S3Store(uri)
    try:
        key = store.step_key(3, "rank-00003.safetensors")
        body = bytearray(store.client.get_object(Bucket=store.bucket, Key=key)["Body"].read())
        body[-2] ^= 0xFF
        store.client.put_object(Bucket=store.bucket, Key=key, Body=bytes(body))
    finally:
        store.close()
    res = _run(2, "restore", tmp_path / "newer{rank}", tmp_path / "r2.st", env=env)
    assert [r["step"] for r in res] == [2, 2]
    _assert_same(tmp_path / "saved2.st", tmp_path / "r2.st")


def test_an_older_step_is_crc_checked_when_it_is_the_one_chosen(tmp_path: Path) -> None:
    """Only the newest complete local step is CRC-checked up front; an older one gets its
    CRC32C check when the newer one fails and it is chosen -- here it fails too."""
    ck = tmp_path / "ck"
    _run(2, "save", ck, tmp_path / "saved2.st", "2")
    _run(2, "save", ck, tmp_path / "saved3.st", "3")
    for step, rank in ((3, 1), (2, 0)):
        f = ck / step_dirname(step) / f"rank-0000{rank}.safetensors"
        data = bytearray(f.read_bytes())
        data[-7] ^= 0x01  # same size: only the CRC32C can tell
        f.write_bytes(bytes(data))
    procs = launch_ranks(lambda r: [sys.executable, CHILD, "restore", str(ck), str(tmp_path / "r.st")], 2)
    for code, _, err in finish_ranks(procs):  # every step is corrupt: not a fresh start, on every rank
        assert code != 0 and "AllStepsCorruptError" in err, err[-3000:]
        assert "step 3: rank 1:" in err and "step 2: rank 0:" in err and "CRC32C" in err, err[-3000:]


def test_a_dcp_save_that_fails_on_one_rank_fails_on_every_rank_at_once_and_commits_nothing(tmp_path: Path) -> None:
    res = _run(2, "dcp-bad", tmp_path / "ck", tmp_path / "unused.st", env={"TIMEOUT": "60"})
    for r in res:
        assert r["error"] == "CheckpointException" and r["steps"] == [], r
        # told by the failing rank, not by the collective timeout
        assert "could not exchange" not in r["message"], r["message"]
        assert "odd.fn: value of type builtins.builtin_function_or_method cannot be checkpointed" in r["message"]


def test_dcp_through_spotckpt_behaves_like_dcps_own_storage_on_two_ranks(tmp_path: Path) -> None:
    """One 2-rank job (see dcp_child.py): a row-wise ShardedTensor saved by DCP right after an
    async manager save, loaded column-wise, into a DTensor and into a plain bf16 tensor; the
    nested dict back by key; a load refused on one rank changes nothing on any rank."""
    res = _run(2, "parity", tmp_path / "ck", tmp_path / "unused", child=DCP_CHILD)
    for rank, r in enumerate(res):
        assert r["steps"] == [1, 2], r
        assert r["columns"] and r["dtensor"] and r["plain_bf16"] and r["by_key"], r
        # DCP raises every rank's failure on every rank: rank 1's refusal, rank 0 told of it
        assert r["error"] == "CheckpointException" and "PickleRefusedError" in r["message"], r
        assert r["untouched"] is True, r
