"""``benchmarks/bench_sharded.py`` end to end on a tiny FSDP2 state: its resharding restore row
(saved by 2 ranks, restored by 1) runs every method and checks every restored element.

No timing is asserted: only that the row ran, that each method restored exactly what was saved
(the bench's own element-by-element check), and that the JSON holds what the README reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ranks]

REPO = Path(__file__).resolve().parents[2]


def test_tiny_resharding_restore_row(tmp_path: Path) -> None:
    out = tmp_path / "sharded.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_sharded.py"), "--mib", "4", "--rows", "restore",
         "--restores", "1", "--save-ranks", "2", "--restore-ranks", "1", "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    row = res["restore"]
    assert (row["save_ranks"], row["restore_ranks"]) == (2, 1)
    assert row["job_bytes"] >= 3 * res["param_bytes"]  # parameters + AdamW's two moments
    for method in ("spotckpt", "dcp_fs", "dcp_spotckpt"):
        assert row[method]["correct_every_rank_every_repeat"] is True, method
        assert row[method]["median_s"] > 0
    assert row["spotckpt_over_dcp_fs"] > 0
    assert res["machine"]["cpu_model"] is not None
    assert "| restore 2 -> 1, s |" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["sharded.json"]  # the checkpoints are gone
