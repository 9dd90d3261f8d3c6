"""``spotckpt bench`` without subprocesses: the row registry, rows run in this process on a tiny
state, the orchestrator with a fake worker, and the reports on synthetic results.

No timing is asserted anywhere. The end-to-end run (real worker processes) is in
tests/integration/test_bench_run.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import spotckpt.tools.bench as bench
from spotckpt.tools.bench import report, rows, worker

STATE = "cpu-float32-8MiB"


# --------------------------------------------------------------------------------------------
# registry


def test_registry_holds_every_row_once_with_a_valid_kind() -> None:
    names = [r.name for r in rows.ROWS]
    assert names == [
        "raw_write_fsync", "memcpy_reused", "clone_alloc",
        "torch_save_fsync", "dcp_save", "dcp_async_save", "torchsnapshot_take",
        "spotckpt_async", "spotckpt_blocking",
        "torch_load_mmap_copy", "dcp_load", "torchsnapshot_restore",
        "spotckpt_restore", "spotckpt_restore_noverify",
    ]
    assert set(rows.ROW_BY_NAME) == set(names)
    kinds = [r.kind for r in rows.ROWS]
    assert kinds == sorted(kinds, key=rows.KINDS.index)  # floors, then saves, then restores
    assert len({r.label for r in rows.ROWS}) == len(names)
    for r in rows.ROWS:
        assert issubclass(r, rows.Row)


def test_rows_declare_the_packages_they_need() -> None:
    by = rows.ROW_BY_NAME
    assert by["torchsnapshot_take"].needs == ("torchsnapshot",)
    assert by["torchsnapshot_restore"].needs == ("torchsnapshot",)
    assert by["dcp_async_save"].needs == ("torch.distributed.checkpoint:async_save",)
    for name in ("spotckpt_async", "spotckpt_blocking", "spotckpt_restore",
                 "spotckpt_restore_noverify"):
        assert by[name].needs == ("spotckpt.manager",)
    for name in ("raw_write_fsync", "memcpy_reused", "clone_alloc", "torch_save_fsync",
                 "torch_load_mmap_copy"):
        assert by[name].needs == ()
        assert by[name].unavailable() is None


def test_a_row_whose_needs_do_not_import_says_why() -> None:
    class Missing(rows.Row):
        name, label, kind = "x_missing", "x", "floor"
        needs = ("os", "spotckpt_no_such_module_xyz")

    class MissingAttr(rows.Row):
        name, label, kind = "x_missing_attr", "x", "floor"
        needs = ("os:no_such_function",)

    class Present(rows.Row):
        name, label, kind = "x_present", "x", "floor"
        needs = ("os:path", "json")

    why = Missing.unavailable()
    assert why is not None and "spotckpt_no_such_module_xyz" in why
    assert "ModuleNotFoundError" in why
    why = MissingAttr.unavailable()
    assert why is not None and "os:no_such_function" in why and "AttributeError" in why
    assert Present.unavailable() is None


def test_register_refuses_a_bad_kind_and_a_duplicate_name() -> None:
    before = list(rows.ROWS)

    class BadKind(rows.Row):
        name, label, kind = "x_bad_kind", "x", "load"

    class Duplicate(rows.Row):
        name, label, kind = "dcp_save", "x", "save"

    with pytest.raises(ValueError, match="kind"):
        rows.register(BadKind)
    with pytest.raises(ValueError, match="twice"):
        rows.register(Duplicate)
    assert rows.ROWS == before


def test_select_keeps_registry_order_and_refuses_unknown_names() -> None:
    assert rows.select("all") == rows.ROWS
    picked = rows.select(" spotckpt_restore, memcpy_reused ")
    assert [r.name for r in picked] == ["memcpy_reused", "spotckpt_restore"]
    with pytest.raises(ValueError, match="nope"):
        rows.select("memcpy_reused,nope")
    with pytest.raises(ValueError):
        rows.select(",")


def test_gpu_labels_only_on_cuda() -> None:
    r = rows.ROW_BY_NAME["memcpy_reused"]
    assert r.label_for("cpu") == "copy into reused buffers (floor)"
    assert r.label_for("cuda") == "pinned D2H copy into reused buffers (floor)"
    assert rows.ROW_BY_NAME["dcp_save"].label_for("cuda") == "DCP save"


# --------------------------------------------------------------------------------------------
# rows run in this process on a tiny state


TINY = worker.StateSpec(device="cpu", dtype="float32", size_mib=1, n_tensors=4)


@pytest.mark.parametrize("name", ["raw_write_fsync", "memcpy_reused", "torch_save_fsync",
                                  "torch_load_mmap_copy", "spotckpt_async", "spotckpt_restore"])
def test_run_worker_in_process(name: str, tmp_path: Path) -> None:
    rec = worker.run_worker(TINY, name, reps=2, workdir=str(tmp_path))
    assert rec["row"] == name and rec["state"] == "cpu-float32-1MiB"
    assert rec["bytes"] == 1 << 20
    assert len(rec["stall_samples_s"]) == 2 == len(rec["durable_samples_s"])
    assert rec["stall_s"] == min(rec["stall_samples_s"])
    assert rec["durable_s"] == min(rec["durable_samples_s"])
    assert all(s > 0 for s in rec["stall_samples_s"])
    assert all(d >= s for s, d in zip(rec["stall_samples_s"], rec["durable_samples_s"]))
    assert rec["peak_rss_delta_bytes"] >= 0


def test_save_rows_keep_one_checkpoint_on_disk(tmp_path: Path) -> None:
    ctx = worker.Ctx(TINY, worker.build_state(TINY), str(tmp_path))
    row = rows.ROW_BY_NAME["torch_save_fsync"](ctx)
    row.prepare()
    for _ in range(3):
        row.call()
    assert [p.name for p in tmp_path.iterdir()] == ["torch.pt-3"]


def test_a_restore_that_restores_nothing_fails(tmp_path: Path) -> None:
    class NoOpRestore(rows.RestoreRow):
        name, label = "x_noop_restore", "x"

        def write(self) -> None:
            pass

        def load(self) -> None:
            pass

    ctx = worker.Ctx(TINY, worker.build_state(TINY), str(tmp_path))
    row = NoOpRestore(ctx)
    row.prepare()
    with pytest.raises(AssertionError, match="differs from what was saved"):
        row.call()


def test_build_state_tensors_differ() -> None:
    state = worker.build_state(TINY)
    assert len(state) == 4
    heads = [t[:8].tolist() for t in state.values()]
    assert len({tuple(h) for h in heads}) == 4
    assert sum(t.numel() * t.element_size() for t in state.values()) == 1 << 20


def test_worker_main_turns_a_failure_into_an_error_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = json.dumps({"spec": {"device": "cpu", "dtype": "float32", "size_mib": 1,
                                   "n_tensors": 1},
                          "row": "no_such_row", "reps": 1, "workdir": str(tmp_path)})
    assert worker.worker_main(payload) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(worker.MARKER)
    rec = json.loads(line[len(worker.MARKER):])
    assert rec["row"] == "no_such_row" and rec["error"].startswith("KeyError")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_sees_a_transient_allocation() -> None:
    rss = worker.PeakRSS()
    try:
        base = worker.rss_bytes()
        rss.reset()
        buf = bytearray(64 << 20)  # zero-filled, every page touched
        del buf
        assert rss.peak() - base >= 60 << 20
        rss.reset()
        assert rss.peak() - base < 60 << 20
    finally:
        rss.close()


# --------------------------------------------------------------------------------------------
# the orchestrator with a fake worker


def test_run_suite_skips_unavailable_rows_and_fills_in_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unavailable(rows.Row):
        name, label, kind = "dcp_save", "DCP save", "save"  # pretend DCP is missing
        needs = ("spotckpt_no_such_module_xyz",)

    spawned: list[str] = []

    def fake_spawn(spec: worker.StateSpec, row: str, **kw: Any) -> dict[str, Any]:
        spawned.append(row)
        return {"row": row, "state": spec.key, "bytes": 8 << 20, "stall_s": 0.5,
                "durable_s": 2.0, "first_stall_s": 1.0, "first_durable_s": 3.0,
                "peak_rss_delta_bytes": 0}

    monkeypatch.setattr(bench, "_spawn_worker", fake_spawn)
    spec = worker.StateSpec(device="cpu", dtype="float32", size_mib=8, n_tensors=16)
    lines: list[str] = []
    result = bench.run_suite([spec], rows=[rows.ROW_BY_NAME["memcpy_reused"], Unavailable],
                             reps=1, base_dir=str(tmp_path), progress=lines.append)
    assert spawned == ["memcpy_reused"]
    got = {r["row"]: r for r in result["rows"]}
    assert got["memcpy_reused"]["gbps"] == pytest.approx((8 << 20) / 2.0 / 1e9)
    assert got["memcpy_reused"]["kind"] == "floor"
    assert "spotckpt_no_such_module_xyz" in got["dcp_save"]["skipped"]
    assert "stall_s" not in got["dcp_save"]
    assert any("skipped" in s for s in lines)
    assert result["schema"] == bench.SCHEMA and result["interrupted"] is False
    assert list(tmp_path.iterdir()) == []  # the data dir is removed
    md = report.render_markdown(result)
    assert "Rows skipped on this machine:" in md
    assert "| DCP save |" not in md  # a skipped row is not a table row


# --------------------------------------------------------------------------------------------
# reports on synthetic results


def _fake(row: str, stall: float, durable: float | None = None, state: str = STATE) -> dict:
    durable = stall if durable is None else durable
    cls = rows.ROW_BY_NAME[row]
    return {"row": row, "state": state, "bytes": 8 << 20, "stall_s": stall,
            "durable_s": durable, "kind": cls.kind, "label": cls.label,
            "gbps": (8 << 20) / durable / 1e9 if durable else 0.0, "peak_rss_delta_bytes": 3 << 20,
            "first_stall_s": stall * 2, "first_durable_s": durable * 2, "size_mib": 8}


ROWS_8 = [
    _fake("raw_write_fsync", 1.0),
    _fake("memcpy_reused", 0.1),
    _fake("dcp_async_save", 0.6, 2.0),
    _fake("spotckpt_async", 0.12, 1.2),
    _fake("spotckpt_blocking", 1.25),
    _fake("torch_load_mmap_copy", 0.5),
    _fake("spotckpt_restore", 0.4),
]


def _result(rs: list[dict], *, load: float = 0.5) -> dict:
    return {"machine": {"cpu_model": "Test CPU", "cpu_count": 2, "ram_bytes": 4 << 30,
                        "torch": "t", "data_fs": "ext4", "loadavg_1_5_15_at_start": [load, 0, 0],
                        "loadavg_1_5_15_at_end": [0.5, 0, 0]},
            "created": "now", "reps": 3, "rows": rs,
            "states": [{"key": STATE, "title": "8 MiB float32 on cpu (16 tensors)"}]}


def test_summary_ratios() -> None:
    s = report.summarize(ROWS_8, STATE)
    assert set(s) == {r.key for r in report.RATIOS}
    assert s["spotckpt_stall_over_memcpy"]["value"] == pytest.approx(1.2)
    assert s["dcp_async_block_over_spotckpt_stall"]["value"] == pytest.approx(5.0)
    assert s["spotckpt_blocking_throughput_over_raw"]["value"] == pytest.approx(0.8)
    assert s["spotckpt_async_durable_over_raw"]["value"] == pytest.approx(1.2)
    assert s["spotckpt_restore_over_torch_load_mmap"]["value"] == pytest.approx(0.8)
    assert s["torch_save_over_spotckpt_blocking"] is None  # no torch.save row


def test_summary_ignores_other_states_failed_rows_and_zero_denominators() -> None:
    rs = [_fake("memcpy_reused", 0.0), _fake("spotckpt_async", 0.2),
          _fake("raw_write_fsync", 1.0, state="cpu-float32-1MiB"),
          {"row": "spotckpt_blocking", "state": STATE, "error": "boom"},
          {"row": "dcp_async_save", "state": STATE, "skipped": "needs x"}]
    s = report.summarize(rs, STATE)
    assert s["spotckpt_stall_over_memcpy"] is None  # denominator 0
    assert s["spotckpt_blocking_throughput_over_raw"] is None  # raw is another state's
    assert s["dcp_async_block_over_spotckpt_stall"] is None  # skipped


def test_vs_reads_both_ways() -> None:
    assert report.vs(0.6, 0.12) == "5.0× lower"
    assert report.vs(0.6, 1.2) == "2.0× higher"
    assert report.vs(1.0, 1.0) == "1.0× lower"


def test_markdown_rows_and_ratios() -> None:
    md = report.render_markdown(_result(ROWS_8))
    assert "Machine: Test CPU, 2 cores, 4 GiB RAM, no GPU" in md
    assert "## 8 MiB float32 on cpu (16 tensors)" in md
    # spotckpt async: stall 1.2× the copy floor, durable 1.20× raw, 5.0× lower than DCP async
    assert ("| spotckpt save (async) | 0.120 | 1.200 | 0.01 | 3 | 1.2× | 1.20× | 5.0× lower "
            "| 0.240 / 2.400 |") in md
    # restores get no save ratios; DCP async_save is not compared with itself
    assert "| spotckpt restore | 0.400 | 0.400 | 0.02 | 3 |  |  |  | 0.800 / 0.800 |" in md
    assert "| DCP async_save | 0.600 | 2.000 | 0.00 | 3 | 6.0× | 2.00× |  |" in md
    assert "| spotckpt async stall ÷ copy into reused buffers | 1.20× |" in md
    assert "| torch.save + fsync ÷ spotckpt blocking save | n/a |" in md
    assert "Warning" not in md and "Interrupted" not in md


def test_markdown_has_no_issue_or_target_wording() -> None:
    md = report.render_markdown(_result(ROWS_8)).lower()
    for word in ("issue", "target", " met "):
        assert word not in md, word


def test_markdown_reports_failed_rows_busy_machine_and_interruption() -> None:
    rs = [_fake("memcpy_reused", 0.1),
          {"row": "spotckpt_async", "state": STATE, "kind": "save",
           "label": "spotckpt save (async)", "size_mib": 8, "error": "ImportError: no crc32c"}]
    result = dict(_result(rs, load=3.4), interrupted=True)
    md = report.render_markdown(result)
    assert "| spotckpt save (async) | n/a |" in md
    assert "Rows that failed:" in md
    assert f"- `spotckpt_async` ({STATE}): ImportError: no crc32c" in md
    assert "machine was busy (load 3.4 on 2 cores)" in md
    assert "Interrupted" in md


def test_plot_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rs = ROWS_8 + [{"row": "dcp_save", "state": STATE, "kind": "save", "label": "DCP save",
                    "error": "boom"}]
    path = tmp_path / "save.png"
    report.render_plot(_result(rs), str(path))
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_from_json_renders_the_reports_of_a_saved_run(tmp_path: Path) -> None:
    src = tmp_path / "in.json"
    src.write_text(json.dumps(_result(ROWS_8)))
    out = tmp_path / "out"
    assert bench.main(["--from-json", str(src), "--out", str(out), "--no-plot"]) == 0
    assert (out / "save.md").read_text() == report.render_markdown(_result(ROWS_8))
    assert not (out / "save.json").exists()  # the measured run is not rewritten


def test_bad_arguments_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_spawn(*a: Any, **kw: Any) -> dict:
        raise AssertionError("nothing may run")

    monkeypatch.setattr(bench, "_spawn_worker", no_spawn)
    assert bench.main(["--rows", "nope", "--out", str(tmp_path)]) == 2
    assert bench.main(["--", "--rows", "nope", "--out", str(tmp_path)]) == 2  # CLI separator
    assert bench.main(["--reps", "0", "--out", str(tmp_path)]) == 2
    assert bench.main(["--sizes", "none", "--gpu-gib", "0", "--out", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_list_prints_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for r in rows.ROWS:
        assert r.name in out


def test_the_cli_hands_its_arguments_to_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    import spotckpt.tools.cli as cli

    seen: list[list[str]] = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli.main(["bench", "--", "--sizes", "2", "--rows", "memcpy_reused"]) == 0
    assert seen == [["--", "--sizes", "2", "--rows", "memcpy_reused"]]
