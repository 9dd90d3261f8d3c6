"""Collective adopt and restore_folder: two ranks on two hosts (two local dirs), each holding only
what its own rank wrote, committed as one step with one manifest, uploaded from both hosts, and
brought back whole to every host -- from S3 on fresh hosts, from the other host without S3."""

from __future__ import annotations

import sys
from pathlib import Path

from spotckpt.remote.s3 import S3Store
from tests.helpers import assert_all_steps_verify, finish_ranks, launch_ranks, result_of

CHILD = str(Path(__file__).with_name("adopt_child.py"))
EVERY = ["model.safetensors", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"]


def test_adopt_on_two_hosts_then_restore_folder_from_s3_and_from_the_other_host(tmp_path: Path, bucket: str) -> None:
    uri = f"s3://{bucket}/job"
    results = finish_ranks(launch_ranks(lambda r: [sys.executable, CHILD, str(tmp_path)], 2, env={"S3_URI": uri}))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    r0, r1 = (result_of(out) for _, out, _ in results)
    # each host committed what it holds; one manifest lists every host's files
    assert sorted(r0["adopted"]) == ["model.safetensors", "rng_state_0.pth", "trainer_state.json"]
    assert sorted(r1["adopted"]) == ["rng_state_1.pth"]
    store = S3Store(uri)
    try:
        assert store.list_steps() == [10, 20]
        m = store.read_manifest(20)
        assert sorted(m.files) == EVERY and m.extra["world_size"] == 2 and m.extra["layout"] == "folder"
        assert m.extra["adopted"] == "checkpoint-20" and store.missing_objects(20, m) == []
        assert store.read_manifest(10).extra["meta"] == {"framework": "test"}
    finally:
        store.close()
    # a fresh host gets every file of step 20 from S3; without S3 the other host sends what it lacks
    for key, host in (("from_s3", "b"), ("from_host", "a")):
        (p0, f0), (p1, f1) = r0[key], r1[key]
        assert p0.endswith(f"{host}0/step-000000000020") and p1.endswith(f"{host}1/step-000000000020")
        assert sorted(f0) == EVERY and f0 == f1, key
        assert f0 == {**r0["adopted"], **r1["adopted"]}
    assert r0["older"].endswith("step-000000000010") and r1["older"].endswith("step-000000000010")
    for d in ("a0", "a1", "b0", "b1"):
        assert 20 in assert_all_steps_verify(tmp_path / d)
