"""The two pictures, rendered headless (Agg) and looked at: ``spotckpt simulate --plot`` and
``spotckpt bench``'s chart."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from spotckpt.tools.simulate import _write_plot
from spotckpt.tools.simulate.summary import InstanceRecord, JobRecord, summary

REPO = Path(__file__).resolve().parents[2]


def _progress(a: int, b: int, t0: float, dt: float = 0.05) -> tuple[tuple[int, float], ...]:
    return tuple((s, t0 + (s - a) * dt) for s in range(a, b + 1))


def _job() -> JobRecord:
    """Three instances: one interrupted with notice (nothing lost), one killed without notice
    (35 steps lost), one that finishes; a wait for capacity before each restart."""
    i1 = InstanceRecord(number=1, started_s=0.0, ended_s=6.0, training_s=2.0, sigterm_s=5.0, interrupted=True,
                        exit_code=0, step_at_sigterm=59, progress=_progress(1, 60, 2.0),
                        saves=((25, 3.2), (50, 4.45), (60, 5.1)), durable_local=((25, 3.25), (50, 4.5), (60, 5.2)),
                        durable_s3=((25, 3.4), (50, 4.7), (60, 5.5)), preempted_step=60, newest_s3_step=60)
    i2 = InstanceRecord(number=2, started_s=7.0, ended_s=11.0, training_s=8.5, sigterm_s=11.0, interrupted=True,
                        killed=True, exit_code=-9, step_at_sigterm=110, restored_step=60, restore_source="s3://b/j",
                        progress=_progress(61, 110, 8.5), saves=((75, 9.3), (100, 10.55)),
                        durable_local=((75, 9.35), (100, 10.6)), durable_s3=((75, 9.5),))
    i3 = InstanceRecord(number=3, started_s=12.5, ended_s=17.0, training_s=14.0, exit_code=0, restored_step=75,
                        restore_source="s3://b/j", progress=_progress(76, 120, 14.0),
                        saves=((100, 15.25), (120, 16.3)), durable_local=((100, 15.3), (120, 16.35)),
                        durable_s3=((100, 15.45), (120, 16.5)))
    return JobRecord(job="sim-x", command=("python", "examples/train_toy.py", "--steps", "120"), s3_uri="s3://b/j",
                     seed=0, wall_start=0.0, end_s=17.1, outcome="Completed", spot_price_ratio=0.3,
                     instances=(i1, i2, i3), interruptions_planned=2, total_steps=120)


def _rgb(path: Path) -> np.ndarray:
    import matplotlib.image

    return (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(int)


def _not_blank(img: np.ndarray) -> float:
    return float((img.min(axis=2) < 235).mean())  # the share of pixels that are not (near) white


def test_simulate_timeline_shows_every_instance_interruption_and_durable_step(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from spotckpt.tools.simulate.plot import _TRAIN, plot_job

    job = _job()
    path = tmp_path / "job.png"
    counts = plot_job(job, summary(job), path, notices=[True, False])
    assert counts == {"instances": 3, "interruptions": 2, "saves": 7, "durable_local": 7, "durable_s3": 6,
                      "waits": 2, "lost": 1}
    img = _rgb(path)
    assert img.shape[1] == 1200 and 400 <= img.shape[0] <= 700
    assert _not_blank(img) > 0.05
    # the instance bars, counted in the image: bands of the training colour below the legend
    train = np.array([int(_TRAIN[i:i + 2], 16) for i in (1, 3, 5)])
    rows = np.where((np.abs(img[:, : int(img.shape[1] * 0.8)] - train).sum(axis=2) < 30).sum(axis=1) > 20)[0]
    rows = rows[rows > img.shape[0] * 0.15]
    bands = 1 + int((np.diff(rows) > 1).sum()) if rows.size else 0
    assert bands == 3, rows


def test_simulate_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = io.StringIO()
    job = _job()
    _write_plot(job, summary(job), tmp_path / "job.png", out)
    assert out.getvalue().count("\n") == 1 and "pip install 'spotckpt[bench]'" in out.getvalue()
    assert not (tmp_path / "job.png").exists()


def test_bench_chart_shows_each_method_in_each_panel_with_its_floor(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from spotckpt.tools.bench import report

    result = json.loads((REPO / "benchmarks" / "out" / "save.json").read_text())  # a real run: 2 sizes
    path = tmp_path / "save.png"
    counts = report.render_plot(result, str(path))
    # 2 sizes x (stall, durable, S3 -- not measured here --, restore); 6 save methods, 4 restore ones
    assert counts == {"states": 2, "panels": 8, "methods": 10, "bars": 2 * (6 + 6 + 4), "floors": 2 * 3}
    img = _rgb(path)
    assert img.shape[1] == 1260 and _not_blank(img) > 0.04
    with_s3 = dict(result, rows=[dict(r, s3_s=r["durable_s"] * 3) if r.get("kind") == "save" else r
                                 for r in result["rows"]])
    assert report.render_plot(with_s3, str(path))["bars"] == 2 * (6 + 6 + 6 + 4)
