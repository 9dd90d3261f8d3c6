"""What a user reads on the console: lines in the order they were written, whole, metric lines
from every uploader, no banner torchrun would print on every start."""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path

import pytest

from spotckpt.remote.s3 import S3Store
from spotckpt.remote.sidecar import final_upload, run_sync, torchrun_nproc, with_torchrun_threads
from spotckpt.tools.simulate.process import TrainerProcess
from tests.helpers import write_step


def test_simulate_copies_stdout_and_stderr_in_the_order_written(tmp_path: Path) -> None:
    # the trainer's pattern: a metric line on stderr, then its own line on stdout right after
    child = ("import sys\nfor i in range(300):\n"
             "    sys.stderr.write(f'e{i}\\n'); sys.stderr.flush()\n"
             "    sys.stdout.write(f'o{i}\\n'); sys.stdout.flush()\n"
             "sys.stderr.write('boom\\n')\nsys.exit(3)\n")
    echo = io.StringIO()
    proc = TrainerProcess([sys.executable, "-c", child], env={"PYTHONUNBUFFERED": "1"}, log_path=tmp_path / "out.log",
                          echo=echo, lock=threading.Lock())
    assert proc.wait() == 3
    want = [x for i in range(300) for x in (f"e{i}", f"o{i}")] + ["boom"]
    assert echo.getvalue().splitlines() == [f"  | {x}" for x in want]
    assert (tmp_path / "out.log").read_text().splitlines() == want
    assert proc.output_tail()[-2:] == ["o299", "boom"]  # the failed job's summary shows these


def test_torchrun_gets_omp_num_threads_unless_the_user_set_it() -> None:
    assert torchrun_nproc(["torchrun", "--nproc_per_node", "2", "t.py"]) == 2
    assert torchrun_nproc([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "t.py"]) == 4
    assert torchrun_nproc(["torchrun", "t.py", "--nproc_per_node", "2"]) is None  # the script's own argument
    assert torchrun_nproc(["torchrun", "--nproc_per_node=auto", "t.py"]) is None
    assert torchrun_nproc(["python", "t.py"]) is None
    two = ["torchrun", "--nproc_per_node", "2", "t.py"]
    assert with_torchrun_threads(two, {"A": "1"}) == {"A": "1", "OMP_NUM_THREADS": "1"}
    assert with_torchrun_threads(two, {"OMP_NUM_THREADS": "8"}) == {"OMP_NUM_THREADS": "8"}
    assert with_torchrun_threads(["torchrun", "--nproc_per_node", "1", "t.py"], {}) == {}
    assert with_torchrun_threads(["python", "t.py"], {}) == {}


def test_sync_and_the_launchers_final_upload_print_durable_s3_lines(
        bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPOTCKPT_METRICS", raising=False)
    local = tmp_path / "ckpt"
    write_step(local, 5)
    assert run_sync(local, f"s3://{bucket}/j", once=True) == 0  # spotckpt sync --once
    write_step(local, 9)
    with S3Store.open(f"s3://{bucket}/j") as store:  # spotckpt run, after its trainer exited
        assert final_upload(local, store) == 9
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("spotckpt event=")]
    assert [ln.split(" seconds=")[0] for ln in lines] == ["spotckpt event=durable_s3 step=5",
                                                        "spotckpt event=durable_s3 step=9"]
    assert all(" bytes=" in ln for ln in lines), lines
    monkeypatch.setenv("SPOTCKPT_METRICS", "0")
    write_step(local, 11)
    assert run_sync(local, f"s3://{bucket}/j", once=True) == 0
    assert "event=" not in capfd.readouterr().err
