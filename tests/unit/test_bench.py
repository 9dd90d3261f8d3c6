"""The benchmark harness: a tiny real run produces JSON, markdown and PNG with every row.

No timing is asserted anywhere: only that each row ran (or says why it could not), that the
restores it timed really restored the saved values (the worker checks and would record an
error), and that the reports hold every row.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from spotckpt import bench

EXPECTED_ROWS = [r.name for r in bench.ROWS]


def _spotckpt_importable() -> bool:
    try:
        from spotckpt import CheckpointManager  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench-out")
    data = tmp_path_factory.mktemp("bench-data")
    rc = bench.main(["--sizes", "2", "--gpu-gib", "0", "--reps", "1", "--out", str(out),
                     "--dir", str(data), "--timeout", "300"])
    assert rc == 0
    result = json.loads((out / "save.json").read_text())
    # every worker's temp dir is gone: nothing left on the disk under test
    assert list(data.iterdir()) == []
    return result, out


def test_smoke_json_has_every_row_and_machine_info(smoke: tuple[dict, Path]) -> None:
    result, _ = smoke
    assert result["schema"] == bench.SCHEMA
    assert [s["key"] for s in result["states"]] == ["cpu-float32-2MiB"]
    rows = {r["row"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(EXPECTED_ROWS)
    m = result["machine"]
    for key in ("cpu_model", "cpu_count", "ram_bytes", "torch", "cuda", "data_fs"):
        assert key in m
    assert m["page_cache_dropped"] is False
    must_run = [r for r in EXPECTED_ROWS if not r.startswith(("spotckpt_", "torchsnapshot_"))]
    if importlib.util.find_spec("torchsnapshot") is not None:
        must_run += ["torchsnapshot_take", "torchsnapshot_restore"]
    if _spotckpt_importable():
        must_run += ["spotckpt_async", "spotckpt_blocking", "spotckpt_restore", "spotckpt_restore_noverify"]
    for name in EXPECTED_ROWS:
        rec = rows[name]
        if name in must_run:
            assert "error" not in rec, (name, rec.get("error"))
        if "error" in rec:
            assert rec["error"]
            continue
        assert rec["bytes"] == 2 << 20
        # with one rep both minima come from the same call: durable never precedes the stall
        assert 0 < rec["stall_s"] <= rec["durable_s"]
        assert rec["gbps"] > 0
        assert len(rec["stall_samples_s"]) == 1 == len(rec["durable_samples_s"])
        assert rec["peak_rss_delta_bytes"] >= 0
        assert rec["rss_method"] in ("VmHWM", "sampled-2ms")
    # async rows time the return of the call and the end of the save separately
    dcpa = rows["dcp_async_save"]
    assert dcpa["durable_s"] >= dcpa["stall_s"]


def test_smoke_markdown_and_png(smoke: tuple[dict, Path]) -> None:
    result, out = smoke
    md = (out / "save.md").read_text()
    assert md == bench.render_markdown(result)
    for r in bench.ROWS:
        assert f"| {r.label} |" in md, r.label
    assert "2 MiB float32 on cpu" in md
    assert "DCP async_save blocking" in md
    png = (out / "save.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def _fake(row: str, stall: float, durable: float | None = None, kind: str = "save") -> dict:
    durable = stall if durable is None else durable
    return {"row": row, "state": "cpu-float32-8MiB", "bytes": 8 << 20, "stall_s": stall,
            "durable_s": durable, "kind": kind, "label": bench.ROW_BY_NAME[row].label,
            "gbps": (8 << 20) / durable / 1e9, "peak_rss_delta_bytes": 0,
            "first_stall_s": stall, "first_durable_s": durable, "size_mib": 8}


def test_summary_ratios_and_targets() -> None:
    rows = [
        _fake("raw_write_fsync", 1.0, kind="floor"),
        _fake("memcpy_reused", 0.1, kind="floor"),
        _fake("dcp_async_save", 0.6, 2.0),
        _fake("spotckpt_async", 0.12, 1.2),
        _fake("spotckpt_blocking", 1.25),
        _fake("torch_load_mmap_copy", 0.5, kind="restore"),
        _fake("spotckpt_restore", 0.4, kind="restore"),
    ]
    s = bench.summarize(rows, "cpu-float32-8MiB")
    assert s["spotckpt_stall_over_memcpy"]["value"] == pytest.approx(1.2)
    assert s["spotckpt_stall_over_memcpy"]["met"] is True
    assert s["dcp_async_block_over_spotckpt_stall"]["value"] == pytest.approx(5.0)
    assert s["dcp_async_block_over_spotckpt_stall"]["met"] is True
    assert s["spotckpt_blocking_throughput_over_raw"]["value"] == pytest.approx(0.8)
    assert s["spotckpt_blocking_throughput_over_raw"]["met"] is False
    assert s["spotckpt_restore_over_torch_load_mmap"]["met"] is True
    assert s["torch_save_over_spotckpt_blocking"] is None  # no torch.save row
    # a GPU state is held to the 20x target
    gpu_rows = [dict(r, state="cuda-bfloat16-4096MiB") for r in rows]
    g = bench.summarize(gpu_rows, "cuda-bfloat16-4096MiB")
    assert g["dcp_async_block_over_spotckpt_stall"]["target"] == 20.0
    assert g["dcp_async_block_over_spotckpt_stall"]["met"] is False


def test_markdown_reports_missing_rows_as_na() -> None:
    rows = [_fake("memcpy_reused", 0.1, kind="floor"),
            {"row": "spotckpt_async", "state": "cpu-float32-8MiB", "kind": "save",
             "label": "spotckpt save (async)", "size_mib": 8,
             "error": "ImportError: cannot import name 'CheckpointManager'"}]
    spec = bench.StateSpec(device="cpu", dtype="float32", size_mib=8, n_tensors=16)
    result = {"machine": {"cpu_model": "x", "cpu_count": 2, "ram_bytes": 1 << 30, "torch": "t",
                          "data_fs": "ext4"},
              "created": "now", "reps": 1, "rows": rows,
              "states": [{"key": spec.key, "title": spec.title}],
              "summary": {spec.key: bench.summarize(rows, spec.key)}}
    md = bench.render_markdown(result)
    assert "| spotckpt save (async) | n/a |" in md
    assert "`spotckpt_async` (cpu-float32-8MiB): ImportError" in md


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_rss_sees_a_transient_allocation() -> None:
    rss = bench.PeakRSS()
    try:
        base = bench._rss_bytes()
        rss.reset()
        buf = bytearray(64 << 20)  # zero-filled, every page touched
        del buf
        assert rss.peak() - base >= 60 << 20
        rss.reset()
        assert rss.peak() - base < 60 << 20
    finally:
        rss.close()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    assert bench.main(["--rows", "nope", "--out", str(tmp_path)]) == 2
    assert bench.main(["--", "--rows", "nope", "--out", str(tmp_path)]) == 2  # CLI separator
    assert bench.main(["--reps", "0", "--out", str(tmp_path)]) == 2
    assert bench.main(["--sizes", "none", "--gpu-gib", "0", "--out", str(tmp_path)]) == 2


def test_sigterm_kills_the_worker_and_removes_its_data(tmp_path: Path) -> None:
    """`timeout` (as in gpu_check.sh) sends SIGTERM: no worker may keep writing after it, and
    the rows measured so far still reach the reports."""
    import signal
    import subprocess
    import time

    psutil = pytest.importorskip("psutil")
    data = tmp_path / "data"
    data.mkdir()
    script = Path(bench.__file__).resolve().parents[1] / "benchmarks" / "bench_save.py"
    proc = subprocess.Popen([sys.executable, str(script), "--sizes", "64", "--rows", "dcp_save",
                             "--reps", "1000", "--out", str(tmp_path / "out"), "--dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        workers: list = []
        while not workers and time.monotonic() < deadline:  # a worker has started writing
            workers = [c for c in parent.children(recursive=True)
                       if any("dcp-" in p for p in _files_under(data))]
            time.sleep(0.2)
        assert workers, "the worker never started writing"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive
        assert list(data.iterdir()) == []
        # what was measured before the signal is still written, marked as interrupted
        result = json.loads((tmp_path / "out" / "save.json").read_text())
        assert result["interrupted"] is True
        assert "Interrupted" in (tmp_path / "out" / "save.md").read_text()
        assert (tmp_path / "out" / "save.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _files_under(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*")]
