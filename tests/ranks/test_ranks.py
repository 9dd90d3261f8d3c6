"""Several ranks: real processes in a torch.distributed gloo group on 127.0.0.1, each "host" a
separate local_dir. The commit, restore agreement and failure paths of the contract."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spotckpt.core.local import LocalStore
from tests.helpers import REPO, finish_ranks, launch_ranks, result_of

CHILD = str(Path(__file__).with_name("rank_child.py"))


def _run(scenario: str, dirs: list[Path], *args: str, env: dict[str, str] | None = None,
         timeout: float = 300) -> list[tuple[int, str, str]]:
    procs = launch_ranks(lambda r: [sys.executable, CHILD, scenario, str(dirs[r]), *args], len(dirs), env=env)
    return finish_ranks(procs, timeout=timeout)


def _ok(results: list[tuple[int, str, str]]) -> list[dict]:  # type: ignore[type-arg]
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return [result_of(out) for _, out, _ in results]


@pytest.mark.parametrize("mode", ["async", "blocking"])
def test_one_manifest_lists_every_rank_and_replicated_state_is_written_once(tmp_path: Path, mode: str) -> None:
    hosts = [tmp_path / "host0", tmp_path / "host0", tmp_path / "host1"]  # ranks 0,1 share a host
    res = _ok(_run("save", hosts, mode, "10", "20"))
    assert all(r["steps"] == [10, 20] for r in res)
    for host, files_here in ((tmp_path / "host0", {"rank-00000", "rank-00001"}), (tmp_path / "host1", {"rank-00002"})):
        store = LocalStore(host, create=False, cleanup=False)
        assert store.committed_steps() == [10, 20]
        for step in (10, 20):
            m = store.read_manifest(step)
            assert m.extra["world_size"] == 3 and m.extra["replicated"] == ["model", "optim"]
            assert set(m.files) == {f"rank-{r:05d}.{ext}" for r in range(3) for ext in ("safetensors", "tree.json")}
            present = {p.name for p in store.step_path(step).iterdir()} - {"manifest.json"}
            assert {n.split(".")[0] for n in present} == files_here  # each host: its own files only
            assert store.verify_step(step, files=present).ok
        assert list(store.staging_root.iterdir()) == []
    m = LocalStore(tmp_path / "host0", create=False, cleanup=False).read_manifest(20)
    # the DDP module and its optimizer live in rank 0's file only
    assert m.files["rank-00000.safetensors"].size > 64 * 64 * 4
    assert m.files["rank-00001.safetensors"].size < 1024 and m.files["rank-00002.safetensors"].size < 1024
    tree1 = json.loads((tmp_path / "host0" / "step-000000000020" / "rank-00001.tree.json").read_text())
    assert set(tree1["keys"]) == {"mine", "info"}
    # the same manifest bytes on every host (SageMaker's sync uploads each host's copy)
    assert (tmp_path / "host0" / "step-000000000020" / "manifest.json").read_bytes() == \
        (tmp_path / "host1" / "step-000000000020" / "manifest.json").read_bytes()


def test_restore_agrees_and_fetches_replicated_state_from_rank_0(tmp_path: Path) -> None:
    hosts = [tmp_path / "h0", tmp_path / "h1"]
    _ok(_run("save", hosts, "async", "10", "20"))
    res = _ok(_run("restore", hosts))
    assert [r["step"] for r in res] == [20, 20]
    assert all(r["model_ok"] and r["mine_ok"] for r in res)
    assert [r["info"] for r in res] == [{"rank": 0, "step": 20}, {"rank": 1, "step": 20}]
    # host 1 now holds a verified copy of rank 0's files for step 20
    assert LocalStore(tmp_path / "h1", create=False, cleanup=False).verify_step(20).ok


def test_restore_uses_the_newest_step_every_rank_has(tmp_path: Path) -> None:
    hosts = [tmp_path / "h0", tmp_path / "h1"]
    _ok(_run("save", hosts, "blocking", "10", "20", "30"))
    LocalStore(tmp_path / "h1", create=False, cleanup=False).delete_step(30)  # host 1 lost its newest
    f = tmp_path / "h0" / "step-000000000020" / "rank-00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x10
    f.write_bytes(bytes(raw))  # and step 20 is corrupt on host 0
    res = _ok(_run("restore", hosts))
    assert [r["step"] for r in res] == [10, 10]
    assert all(r["model_ok"] and r["mine_ok"] for r in res)


def test_ranks_passing_different_steps_commit_nothing(tmp_path: Path) -> None:
    res = _ok(_run("bad-step", [tmp_path / "h0", tmp_path / "h1"]))
    assert [r["error"] for r in res] == ["ConfigError", "ConfigError"]
    assert "rank 0: 5, rank 1: 6" in res[0]["message"]
    assert [r["steps"] for r in res] == [[], []]


def test_ranks_passing_different_state_structures_commit_nothing(tmp_path: Path) -> None:
    res = _ok(_run("bad-keys", [tmp_path / "h0", tmp_path / "h1"]))
    assert [r["error"] for r in res] == ["ConfigError", "ConfigError"]
    assert "ranks [1] passed state with other keys" in res[0]["message"]
    assert [r["steps"] for r in res] == [[], []]


def test_a_state_one_rank_cannot_save_fails_on_every_rank_before_anything_is_written(tmp_path: Path) -> None:
    """The state is captured before the ranks agree, so rank 1's unsaveable value fails the
    save on rank 0 too (CollectiveError naming it, instead of rank 0 waiting for rank 1's
    files), and no step is committed."""
    res = _ok(_run("bad-value", [tmp_path / "h0", tmp_path / "h1"]))
    assert [r["error"] for r in res] == ["CollectiveError", "StateError"]
    assert "rank 1 failed (StateError" in res[0]["message"]
    assert [r["steps"] for r in res] == [[], []]


def test_a_rank_killed_during_a_save_makes_the_others_raise_not_hang(tmp_path: Path) -> None:
    hosts = [tmp_path / "h0", tmp_path / "h1"]
    results = _run("die-in-save", hosts, env={"TIMEOUT": "10"})
    assert results[1][0] == -9
    code, out, err = results[0]
    assert code == 0, err[-3000:]
    r = result_of(out)
    assert r["error"] == "CollectiveError", r
    assert "connection to another rank broke" in r["message"], r  # not "within 10 s": it failed at once
    assert r["seconds"] < 60
    assert r["steps"] == [1]  # step 2 never committed anywhere; step 1 stays valid
    for h in hosts:
        assert LocalStore(h, create=False, cleanup=False).committed_steps() == [1]


def test_world_size_change_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    _ok(_run("save", [tmp_path / "h0", tmp_path / "h1"], "blocking", "10"))
    results = _run("restore", [tmp_path / "h0", tmp_path / "h0", tmp_path / "h1"])
    for code, out, err in results:
        assert code != 0
        assert "saved by 2 ranks and this job has 3" in err, err[-2000:]


def test_auto_interval_on_several_ranks_saves_the_same_steps_everywhere(tmp_path: Path) -> None:
    """AutoInterval is a custom policy: rank 0's plan decides, the other ranks follow through the
    request channel (their own clocks and step times differ), and every save commits on all."""
    res = _ok(_run("auto", [tmp_path / "host0", tmp_path / "host1"], "60"))
    assert res[0]["saved"] == res[1]["saved"], res
    # the probe after 3 steps (saved at the step the ranks agree on, a few later), then planned saves
    assert len(res[0]["saved"]) >= 3 and 3 <= res[0]["saved"][0] <= 8
    assert res[0]["interval_s"] is not None and res[0]["interval_s"] <= 0.25
    for r, host in zip(res, ("host0", "host1")):
        committed = LocalStore(tmp_path / host, create=False, cleanup=False).committed_steps()
        assert committed == res[0]["saved"] == r["steps"]


def test_a_collective_error_says_whether_it_timed_out_or_a_rank_went_away() -> None:
    from spotckpt.ranks.dist import _how_it_failed

    reset = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:10149: Connection reset by peer")
    timeout = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 10000ms for recv operation")
    assert _how_it_failed(reset, 10.0) == "because the connection to another rank broke"
    assert _how_it_failed(timeout, 10.0) == "within 10 s"
