"""``spotckpt bench s3`` without a server: the summary of the ranks' records, the report, the
plan with s3torchconnector missing, argument checks and the CPU readings.

No timing is asserted. The run against SeaweedFS is in tests/integration/test_bench_run.py.
"""

from __future__ import annotations

import os
import threading

import pytest

import spotckpt.tools.bench as bench
from spotckpt.tools.bench import s3peers, s3worker


def _sample(wall: float, cpu: float, server: float = 0.0) -> dict[str, float]:
    return {"wall_s": wall, "cpu_s": cpu, "server_cpu_s": server}


def _rank(walls: dict[str, list[float]], cpu: float, server: float, rank: int) -> dict:
    samples = {p: {op: [_sample(w, cpu, server) for w in ws] for op in ("save", "restore")} for p, ws in walls.items()}
    return {"bytes": 1 << 30, "rank": rank, "world": 2, "samples": samples,
            "correct": {p: [True] * len(ws) for p, ws in walls.items()}}


def test_summary_takes_the_slowest_rank_sums_cpu_and_drops_the_warm_up() -> None:
    # repetition 0 is the warm-up (100 s: must not count); rank 1 is slower in repetition 2
    r0 = _rank({"spotckpt": [100.0, 2.0, 2.0, 2.0], "s3torchconnector": [100.0, 3.0, 3.0, 5.0]}, 1.0, 4.0, 0)
    r1 = _rank({"spotckpt": [100.0, 2.0, 4.0, 2.0], "s3torchconnector": [100.0, 3.0, 3.0, 5.0]}, 0.5, 9.0, 1)
    res = s3peers.summarize("dcp", [r0, r1], ["spotckpt", "s3torchconnector"])
    assert res["ranks"] == 2 and res["bytes"] == 1 << 30
    spot = res["ops"]["save"]["spotckpt"]
    assert spot["n"] == 3 and spot["samples_s"] == [2.0, 4.0, 2.0] and spot["warmup_s"] == [100.0]
    assert spot["wall_s"] == {"median": 2.0, "min": 2.0, "max": 4.0}
    assert spot["client_cpu_s_per_GiB"] == pytest.approx(1.5)  # both ranks' CPU
    assert spot["server_cpu_s_per_GiB"] == pytest.approx(4.0)  # rank 0's reading of the server
    other = res["ops"]["restore"]["s3torchconnector"]
    assert other["ratio_vs_spotckpt"] == pytest.approx(3.0 / 2.0)
    assert other["paired_ratio_vs_spotckpt"] == pytest.approx(3.0 / 2.0)  # 1.5, 0.75, 2.5
    assert other["correct_every_rank_every_repetition"] is True
    assert "ratio_vs_spotckpt" not in spot


def test_report_has_a_row_per_op_and_peer_and_the_skipped_peers() -> None:
    rec = {"bytes": 1 << 30,
           "samples": {p: {op: [_sample(1.0 + i, 1.0) for i in range(3)] for op in ("save", "restore")}
                       for p in ("spotckpt", "boto3")},
           "spotckpt_save_phases": {"stall_s": [0.5, 0.1, 0.1], "local_commit_s": [3.0, 2.0, 2.0],
                                    "upload_s": [9.0, 5.0, 7.0]}}
    result = {"machine": {"cpu_model": "X", "cpu_count": 2, "loadavg_start": [1.0], "loadavg_end": [2.0]},
              "server": "seaweedfs", "created": "now", "reps": 2,
              "skipped": ["one: s3torchconnector skipped: not installed"],
              "cases": {"one": s3peers.summarize("one", [rec], ["spotckpt", "boto3"]), "dcp": {"error": "boom"}}}
    md = s3peers.render_markdown(result)
    assert md.count("| save → in S3 |") == 2 and md.count("| restore from S3 |") == 2
    assert "1.00 GiB fp32" in md and "s3torchconnector skipped: not installed" in md
    assert "`boom`" in md and "returned after 0.10 s" in md
    assert "committed locally (written, fsynced) 2.00 s" in md and "part then took 6.00 s" in md
    assert "Interrupted" not in md
    assert "Interrupted" in s3peers.render_markdown(dict(result, interrupted=True))
    lines = s3peers.peer_lines(result)
    assert len(lines) == 4 and all(ln.startswith("one ") for ln in lines)


def test_without_s3torchconnector_its_peer_is_skipped_with_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = s3peers._import_problem
    monkeypatch.setattr(s3peers, "_import_problem",
                        lambda m: "ModuleNotFoundError" if m.startswith("s3torchconnector") else real(m))
    assert bench.main(["s3", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    skipped = [ln for ln in out if "s3torchconnector skipped" in ln]
    assert len(skipped) == 2 and all("pip install" in ln for ln in skipped)  # one per case
    assert "one: spotckpt, spotckpt-after-commit, boto3" in out and "dcp: spotckpt" in out


def test_a_broken_dcp_part_skips_only_the_dcp_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3peers, "_import_problem",
                        lambda m: "ModuleNotFoundError: tenacity" if m == "s3torchconnector.dcp" else None)
    problems = s3peers.peer_problems()
    assert list(problems) == [("dcp", "s3torchconnector")] and "tenacity" in problems[("dcp", "s3torchconnector")]


def test_bad_arguments_are_refused(tmp_path) -> None:
    for argv in (["--cases", "nope"], ["--peers", "boto3"], ["--reps", "0"], ["--peers", "spotckpt,x"],
                 ["--warmup", "-1"], ["--server-cpus", "one"], ["--server-cpus", "1", "--s3-uri", "s3://b/p"],
                 ["--server-cpus", ",".join(map(str, os.sched_getaffinity(0)))]):
        assert s3peers.main([*argv, "--out", str(tmp_path)]) == 2, argv
    assert not list(tmp_path.iterdir())  # refused before anything ran


def _in_a_thread(fn):  # split_cpus pins its calling thread: not the test's
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")
def test_split_cpus_gives_the_server_the_named_cpus_and_pins_the_caller_to_the_rest() -> None:
    mine = sorted(os.sched_getaffinity(0))
    got = _in_a_thread(lambda: (bench.split_cpus(str(mine[-1])), os.sched_getaffinity(0)))
    (server, client), pinned = got
    assert server == {mine[-1]} and client == set(mine[:-1]) and pinned == set(mine[:-1])
    assert sorted(os.sched_getaffinity(0)) == mine  # this thread untouched
    if len(mine) >= 3:
        (server, _), _ = _in_a_thread(lambda: (bench.split_cpus(f"{mine[1]}-{mine[2]}"), None))
        assert server == {mine[1], mine[2]}
    for spec, words in (("x", "expected CPU numbers"), ("1-", "expected CPU numbers"),
                        (",".join(map(str, mine)), "some, not all"), (str(max(mine) + 1000), "some, not all")):
        err = _in_a_thread(lambda spec=spec: bench.split_cpus(spec))
        assert isinstance(err, ValueError) and words in str(err), (spec, err)


def test_cpu_readings() -> None:
    busy = sum(i * i for i in range(200_000))  # some CPU time of our own
    assert busy > 0
    assert s3worker.proc_cpu_s(os.getpid()) > 0
    assert s3worker.proc_cpu_s(None) == 0.0 and s3worker.proc_cpu_s(2**22 + 12345) == 0.0
    assert s3worker.self_cpu_s() > 0
    assert s3worker.order(1, ["a", "b", "c"]) == ["b", "c", "a"] and s3worker.order(3, ["a", "b"]) == ["b", "a"]
    assert s3worker.split_uri("s3://b/p/q/") == ("b", "p/q")
