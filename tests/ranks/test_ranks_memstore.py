"""Two hosts through a store that is not S3: the in-memory reference store, served from this
process to both ranks behind exactly the RemoteStore protocol's methods. Each host uploads its
own files, rank 0 commits the manifest once every host's are in, and new machines restore
from it -- the multi-host commit needs nothing beyond the protocol."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from pathlib import Path

import pytest

from spotckpt.remote.memory import MemoryStore
from spotckpt.core.protocols import RemoteStore
from tests.helpers import finish_ranks, launch_ranks, result_of

CHILD = str(Path(__file__).with_name("rank_child.py"))


@pytest.fixture
def served() -> Iterator[tuple[MemoryStore, str]]:
    store = MemoryStore("two-hosts")

    class Manager(BaseManager):
        pass

    Manager.register("store", callable=lambda: store)
    server = Manager(address=("127.0.0.1", 0), authkey=b"spotckpt-test").get_server()
    threading.Thread(target=server.serve_forever, name="memstore-server", daemon=True).start()
    host, port = server.address
    yield store, f"{host}:{port}"


def _run(scenario: str, dirs: list[Path], *args: str, env: dict[str, str]) -> list[dict]:  # type: ignore[type-arg]
    procs = launch_ranks(lambda r: [sys.executable, CHILD, scenario, str(dirs[r]), *args], len(dirs), env=env)
    results = finish_ranks(procs)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [result_of(out) for _, out, _ in results]


def test_a_two_host_job_commits_and_restores_through_the_in_memory_store(
        tmp_path: Path, served: tuple[MemoryStore, str]) -> None:
    store, address = served
    assert isinstance(store, RemoteStore)
    env = {"MEM_STORE": address}
    _run("save", [tmp_path / "a0", tmp_path / "a1"], "async", "10", "20", env=env)
    assert store.list_steps() == [10, 20]
    m = store.read_manifest(20)
    assert m.extra["world_size"] == 2 and sorted(m.files) == [
        "rank-00000.safetensors", "rank-00000.tree.json", "rank-00001.safetensors", "rank-00001.tree.json"]
    assert store.missing_objects(20, m) == []  # each host's files, right size and CRC32C
    res = _run("restore", [tmp_path / "b0", tmp_path / "b1"], env=env)  # new machines, empty disks
    assert [r["step"] for r in res] == [20, 20]
    assert all(r["model_ok"] and r["mine_ok"] for r in res)
