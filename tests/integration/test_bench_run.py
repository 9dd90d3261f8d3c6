"""``spotckpt bench`` end to end: real worker processes on a tiny state, and SIGTERM mid-run.

No timing is asserted: only that the rows ran in their workers (a restore the worker could not
verify would be an error record), that the reports hold them, and that nothing is left on the
disk under test.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import spotckpt.tools.bench as bench

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROWS = ["memcpy_reused", "torch_save_fsync", "spotckpt_async", "spotckpt_restore"]


def test_tiny_run_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_save.py"), "--sizes", "2",
         "--gpu-gib", "0", "--reps", "1", "--rows", ",".join(ROWS), "--out", str(out),
         "--dir", str(data), "--timeout", "300"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "save.json").read_text())
    assert result["schema"] == bench.SCHEMA
    assert [s["key"] for s in result["states"]] == ["cpu-float32-2MiB"]
    got = {r["row"]: r for r in result["rows"]}
    assert sorted(got) == sorted(ROWS)
    for name, rec in got.items():
        assert "error" not in rec and "skipped" not in rec, (name, rec)
        assert rec["bytes"] == 2 << 20
        assert 0 < rec["stall_s"] <= rec["durable_s"]
        assert rec["worker_wall_s"] > 0
    for key in ("cpu_model", "cpu_count", "ram_bytes", "torch", "cuda", "data_fs"):
        assert key in result["machine"]
    assert result["summary"]["cpu-float32-2MiB"]["spotckpt_stall_over_memcpy"]["value"] > 0
    md = (out / "save.md").read_text()
    assert md.strip() in proc.stdout
    assert "| spotckpt restore | " in md
    assert (out / "save.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(data.iterdir()) == []  # every worker's temp dir is gone


def test_sigterm_kills_the_worker_and_keeps_what_was_measured(tmp_path: Path) -> None:
    """`timeout` (as in gpu_check.sh) sends SIGTERM: no worker may keep writing after it, and
    the rows measured so far still reach the reports."""
    psutil = pytest.importorskip("psutil")
    data = tmp_path / "data"
    data.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "bench_save.py"), "--sizes", "4",
         "--rows", "memcpy_reused,dcp_save", "--reps", "1000", "--out", str(tmp_path / "out"),
         "--dir", str(data)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300
        workers: list = []
        while not workers and time.monotonic() < deadline:  # the dcp_save worker is writing
            if any("dcp-" in str(p) for p in data.rglob("*")):
                workers = parent.children(recursive=True)
            time.sleep(0.2)
        assert workers, "the worker never started writing"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive
        assert list(data.iterdir()) == []
        result = json.loads((tmp_path / "out" / "save.json").read_text())
        assert result["interrupted"] is True
        assert [r["row"] for r in result["rows"]] == ["memcpy_reused"]
        assert "Interrupted" in (tmp_path / "out" / "save.md").read_text()
        assert (tmp_path / "out" / "save.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_without_matplotlib_the_picture_is_skipped_with_one_line(tmp_path: Path) -> None:
    """Everything is measured and written; only save.png is left out, saying how to get it."""
    import os

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None  # unimportable\n")
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "spotckpt.tools.cli", "bench", "--sizes", "1", "--gpu-gib", "0", "--reps", "1",
         "--rows", "memcpy_reused", "--out", str(out), "--dir", str(data)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ModuleNotFoundError" not in proc.stderr and "Traceback" not in proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "matplotlib is not installed" in ln]
    assert len(said) == 1 and "pip install" in said[0], proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["save.json", "save.md"]
    assert json.loads((out / "save.json").read_text())["rows"][0]["row"] == "memcpy_reused"


@pytest.mark.integration
@pytest.mark.ranks
@pytest.mark.parametrize("s3_server", ["seaweedfs"], indirect=True)
def test_s3_peers_tiny_run_against_seaweedfs(tmp_path: Path, bucket: str, s3_server) -> None:
    """`spotckpt bench s3` on a 2 MiB state: every peer of both cases (one process; DCP on two
    gloo ranks) saves to SeaweedFS and restores with its values checked, and the rows are printed
    and written; nothing is left in the bucket or on the disk."""
    pytest.importorskip("s3torchconnector.dcp", reason="s3torchconnector[dcp] (the bench extra) is not installed")
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "spotckpt.tools.cli", "bench", "s3", "--mib", "2", "--reps", "1", "--warmup", "0",
         "--s3-uri", f"s3://{bucket}/b", "--server-pid", str(s3_server.process.pid), "--s3tc-threads", "2",
         "--out", str(out), "--dir", str(data), "--timeout", "300"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "s3peers.json").read_text())
    assert result["skipped"] == [] and set(result["cases"]) == {"one", "dcp"}
    for case, peers in (("one", {"spotckpt", "spotckpt-after-commit", "s3torchconnector", "boto3"}),
                        ("dcp", {"spotckpt", "s3torchconnector"})):
        res = result["cases"][case]
        assert "error" not in res, res
        for op in ("save", "restore"):
            assert set(res["ops"][op]) == peers
            for peer, row in res["ops"][op].items():
                assert row["n"] == 1 and row["wall_s"]["median"] > 0 and row["client_cpu_s_per_GiB"] >= 0
                assert row["server_cpu_s_per_GiB"] >= 0
                assert row.get("correct_every_rank_every_repetition", True), (case, op, peer)
                if peer != "spotckpt":
                    assert row["ratio_vs_spotckpt"] > 0
        assert res["ranks"] == (1 if case == "one" else 2)
    phases = result["cases"]["one"]["spotckpt_save_phases"]  # from the manager's own events
    assert 0 < phases["local_commit_s"]["median"] and 0 < phases["upload_s"]["median"]
    # the rows are printed, one line each, with the ratios against spotckpt's time
    for case, op in (("one", "save"), ("one", "restore"), ("dcp", "save"), ("dcp", "restore")):
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith(f"{case:3s} {op:7s} s3torchconnector")]
        assert len(line) == 1 and "x spotckpt's time" in line[0], proc.stdout[-3000:]
    assert "| restore from S3 | `dcp.load` + s3torchconnector `S3StorageReader` |" in (out / "s3peers.md").read_text()
    assert list(data.iterdir()) == []
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
