"""Several hosts sharing one S3 prefix: each uploads its files, one rank writes the manifest
after every file of every host is in S3; a fresh machine restores from S3; a host killed
mid-upload leaves that step uncommitted."""

from __future__ import annotations

import sys
from pathlib import Path

from spotckpt.core.local import LocalStore
from spotckpt.remote.s3 import S3Store
from tests.helpers import finish_ranks, launch_ranks, result_of

CHILD = str(Path(__file__).with_name("rank_child.py"))


def _run(scenario: str, dirs: list[Path], *args: str, env: dict[str, str]) -> list[tuple[int, str, str]]:
    procs = launch_ranks(lambda r: [sys.executable, CHILD, scenario, str(dirs[r]), *args], len(dirs), env=env)
    return finish_ranks(procs)


def _ok(results: list[tuple[int, str, str]]) -> list[dict]:  # type: ignore[type-arg]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return [result_of(out) for _, out, _ in results]


def test_hosts_upload_their_files_and_a_fresh_job_restores_from_s3(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/job"
    env = {"S3_URI": uri}
    _ok(_run("save", [tmp_path / "a0", tmp_path / "a1"], "async", "10", "20", env=env))
    store = S3Store(uri)
    try:
        assert store.list_steps() == [10, 20]
        m = store.read_manifest(20)
        assert m.extra["world_size"] == 2 and len(m.files) == 4
        assert store.missing_objects(20, m) == []  # every host's files, right size and CRC32C
    finally:
        store.close()
    res = _ok(_run("restore", [tmp_path / "b0", tmp_path / "b1"], env=env))  # new machines
    assert [r["step"] for r in res] == [20, 20]
    assert all(r["model_ok"] and r["mine_ok"] for r in res)
    # each host fetched only the files its ranks need (rank 1: its own and rank 0's replicated ones)
    assert sorted(p.name for p in (tmp_path / "b1" / "step-000000000020").iterdir()) == [
        "manifest.json", "rank-00000.safetensors", "rank-00000.tree.json", "rank-00001.safetensors",
        "rank-00001.tree.json"]


def test_a_host_killed_mid_upload_leaves_the_step_uncommitted(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/job"
    results = _run("die-in-upload", [tmp_path / "a0", tmp_path / "a1"], env={"S3_URI": uri, "TIMEOUT": "20"})
    assert results[1][0] == -9
    assert results[0][0] == 0, results[0][2][-3000:]
    r = result_of(results[0][1])
    assert r.get("wait_ok") is False or r.get("error") == "CollectiveError", r  # never reported durable
    store = S3Store(uri)
    try:
        assert store.list_steps() == [1]  # step 2 has no manifest; step 1 stays valid
    finally:
        store.close()


def test_a_step_only_one_host_kept_is_rolled_back_and_written_again(tmp_path: Path, bucket: str) -> None:
    """Host 0 kept step 30 that host 1 lost (and S3 never got): the agreement picks 20, host 0
    moves its 30 aside, and the job's new save of 30 is committed everywhere -- neither a silent
    no-op (\"already committed\") nor a wait for the stale step's upload until the timeout."""
    uri = f"s3://{bucket}/job"
    hosts = [tmp_path / "h0", tmp_path / "h1"]
    _ok(_run("save", hosts, "blocking", "10", "20", env={"S3_URI": uri}))
    _ok(_run("save", hosts, "blocking", "30", env={}))  # local only: S3 never sees this 30
    LocalStore(hosts[1], create=False, cleanup=False).delete_step(30)
    res = _ok(_run("restore-save", hosts, "30", env={"S3_URI": uri, "TIMEOUT": "120"}))
    assert [r["step"] for r in res] == [20, 20]
    assert all(r["wait_ok"] for r in res) and [r["steps"] for r in res] == [[10, 20, 30]] * 2
    assert all(r["seconds"] < 100 for r in res)  # well inside the collective timeout
    store = S3Store(uri)
    try:
        m = store.read_manifest(30)
        assert store.missing_objects(30, m) == []
        for h in hosts:  # the new step 30, the same on both hosts and in S3
            assert LocalStore(h, create=False, cleanup=False).read_manifest(30) == m
    finally:
        store.close()
    old = LocalStore(hosts[0], create=False, cleanup=False)
    moved = [p for p in old.staging_root.iterdir() if "quarantine" in p.name]
    assert [p.name.rsplit("-", 1)[-1] for p in moved] == ["000000000030"]  # the stale 30, kept aside
