"""Reports of ``spotckpt bench``: ratios, the markdown tables, the bar plot, the output files.

Everything here works on the JSON-ready result of :func:`spotckpt.tools.bench.run_suite` (or one read
back from ``save.json``), so reports can be re-rendered from a saved run. A row record is either
measured (``stall_s``, ``durable_s``, ...), failed (``error``) or skipped (``skipped``: why it
could not run on this machine).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Ratio:
    """``num_row.num_field / den_row.den_field`` for one state."""

    key: str
    text: str
    num_row: str
    num_field: str
    den_row: str
    den_field: str


RATIOS: tuple[Ratio, ...] = (
    Ratio("spotckpt_stall_over_memcpy", "spotckpt async stall ÷ copy into reused buffers",
          "spotckpt_async", "stall_s", "memcpy_reused", "stall_s"),
    Ratio("dcp_async_block_over_spotckpt_stall", "DCP async_save stall ÷ spotckpt async stall",
          "dcp_async_save", "stall_s", "spotckpt_async", "stall_s"),
    Ratio("spotckpt_blocking_throughput_over_raw",
          "spotckpt blocking throughput ÷ raw write+fsync throughput",
          "raw_write_fsync", "durable_s", "spotckpt_blocking", "durable_s"),
    Ratio("spotckpt_async_durable_over_raw", "spotckpt async time to durable ÷ raw write+fsync",
          "spotckpt_async", "durable_s", "raw_write_fsync", "durable_s"),
    Ratio("spotckpt_restore_over_torch_load_mmap", "spotckpt restore ÷ torch.load(mmap) + copy_",
          "spotckpt_restore", "durable_s", "torch_load_mmap_copy", "durable_s"),
    Ratio("torch_save_over_spotckpt_blocking", "torch.save + fsync ÷ spotckpt blocking save",
          "torch_save_fsync", "durable_s", "spotckpt_blocking", "durable_s"),
)


def measured(rec: dict[str, Any]) -> bool:
    return "error" not in rec and "skipped" not in rec


def find(results: Sequence[dict[str, Any]], state: str, row: str) -> dict[str, Any] | None:
    """The measured record of ``row`` for ``state``, or None."""
    for r in results:
        if r["state"] == state and r["row"] == row and measured(r):
            return r
    return None


def summarize(results: Sequence[dict[str, Any]], state: str) -> dict[str, Any]:
    """Every ratio of :data:`RATIOS` for one state: ``{"value": x}``, or None where a row it
    needs was not measured or its denominator is 0."""
    out: dict[str, Any] = {}
    for r in RATIOS:
        num, den = find(results, state, r.num_row), find(results, state, r.den_row)
        if num is None or den is None or den[r.den_field] <= 0:
            out[r.key] = None
        else:
            out[r.key] = {"value": num[r.num_field] / den[r.den_field]}
    return out


def fmt_s(x: float | None) -> str:
    return "–" if x is None else (f"{x:.3f}" if x >= 0.01 else f"{x:.4f}")


def vs(peer_s: float, own_s: float) -> str:
    """How ``own_s`` compares with ``peer_s``: "4.0× lower" or "1.5× higher" (never below 1)."""
    f = peer_s / own_s
    return f"{f:.1f}× lower" if f >= 1 else f"{1 / f:.1f}× higher"


def _load(m: dict[str, Any]) -> str:
    a, b = m.get("loadavg_1_5_15_at_start"), m.get("loadavg_1_5_15_at_end")
    return f"{a[0]:.1f} at start, {b[0]:.1f} at end" if a and b else "unknown"


def machine_line(m: dict[str, Any], created: str) -> str:
    ram = m.get("ram_bytes", 0) / (1 << 30)
    return (f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count')} cores, {ram:.0f} GiB RAM"
            + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
            + f"; torch {m.get('torch')}; data on {m.get('data_fs')}; {created}; "
            f"load average (1 min) {_load(m)}.")


def _row_line(r: dict[str, Any], floor: dict[str, Any] | None, raw: dict[str, Any] | None,
              dcpa: dict[str, Any] | None) -> str:
    if "error" in r:
        return f"| {r['label']} | n/a | n/a | n/a | n/a | | | | {r['error'][:90]} |"
    vs_floor = f"{r['stall_s'] / floor['stall_s']:.1f}×" if floor and r["kind"] != "restore" else ""
    vs_raw = f"{r['durable_s'] / raw['durable_s']:.2f}×" if raw and r["kind"] == "save" else ""
    vs_dcpa = (vs(dcpa["stall_s"], r["stall_s"])
               if dcpa and r["kind"] != "restore" and r["row"] != "dcp_async_save" else "")
    return (f"| {r['label']} | {fmt_s(r['stall_s'])} | {fmt_s(r['durable_s'])} | {r['gbps']:.2f} | "
            f"{r['peak_rss_delta_bytes'] / MIB:.0f} | {vs_floor} | {vs_raw} | {vs_dcpa} | "
            f"{fmt_s(r['first_stall_s'])} / {fmt_s(r['first_durable_s'])} |")


def render_markdown(result: dict[str, Any]) -> str:
    """One table per state, then its ratios; then the rows that failed or were skipped."""
    m = result["machine"]
    lines = [
        "# Checkpoint save/restore, side by side",
        "",
        machine_line(m, result["created"]),
        f"Best of {result['reps']} after one warm-up call, each row in its own process; page "
        "cache not dropped (restores read from memory). Stall = time the caller is held; "
        "durable = until the saver's fsyncs returned. Peak RSS Δ = kernel high-water mark over "
        "the row minus RSS before it.",
    ]
    if result.get("interrupted"):
        lines.append("**Interrupted (Ctrl-C / SIGTERM): only the rows below were measured.**")
    load = (m.get("loadavg_1_5_15_at_start") or [0.0])[0]
    if m.get("cpu_count") and load > m["cpu_count"]:
        lines.append(f"**Warning: the machine was busy (load {load:.1f} on {m['cpu_count']} cores) "
                     "when this run started: timings are inflated and noisy.**")
    lines.append("")
    rows_all = result["rows"]
    for st in result["states"]:
        key = st["key"]
        rows = [r for r in rows_all if r["state"] == key and "skipped" not in r]
        if not rows:
            continue
        lines += [f"## {st['title']}", "",
                  "| row | stall s | durable s | GB/s | peak RSS Δ MiB | stall ÷ copy floor "
                  "| durable ÷ raw write | stall vs DCP async_save | first call stall / durable s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        floor, raw = find(rows_all, key, "memcpy_reused"), find(rows_all, key, "raw_write_fsync")
        dcpa = find(rows_all, key, "dcp_async_save")
        lines += [_row_line(r, floor, raw, dcpa) for r in rows]
        summ = summarize(rows_all, key)
        lines += ["", "| ratio | value |", "|---|---:|"]
        for ratio in RATIOS:
            v = summ[ratio.key]
            lines.append(f"| {ratio.text} | {'n/a' if v is None else format(v['value'], '.2f') + '×'} |")
        lines.append("")
    for field, title in (("error", "Rows that failed:"), ("skipped", "Rows skipped on this machine:")):
        seen: dict[tuple[str, str], list[str]] = {}
        for r in rows_all:
            if field in r:
                seen.setdefault((r["row"], r[field]), []).append(r["state"])
        if seen:
            lines += [title, ""]
            lines += [f"- `{row}` ({', '.join(states)}): {why}" for (row, why), states in seen.items()]
            lines.append("")
    return "\n".join(lines)


#: The panels of the chart: (title, row kind, the record's field, the floor row drawn as a line).
#: A save method has stall, time to durable and (when measured: ``s3_s``) time to S3; a restore
#: method its restore time. A panel whose field no row has says it was not measured.
PLOT_PANELS: tuple[tuple[str, str, str, str], ...] = (
    ("stall: training held", "save", "stall_s", "memcpy_reused"),
    ("time to durable (local disk)", "save", "durable_s", "raw_write_fsync"),
    ("time to S3", "save", "s3_s", "raw_upload"),
    ("restore", "restore", "durable_s", "torch_load_mmap_copy"),
)
_PANEL_COLORS = ("#d62728", "#1f77b4", "#6a3d9a", "#2ca02c")


def render_plot(result: dict[str, Any], path: str) -> dict[str, int]:
    """The chart: per state one row of panels (:data:`PLOT_PANELS`) -- stall, time to durable,
    time to S3 and restore seconds of each method (log scale; spotckpt's bars solid, the others
    light), the physical floor of each drawn as a dashed line. Returns what was drawn:
    ``states``, ``panels``, ``methods`` (distinct methods with a bar), ``bars``, ``floors``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    counts = {"states": 0, "panels": 0, "methods": 0, "bars": 0, "floors": 0}
    states = [(st, [r for r in result["rows"] if r["state"] == st["key"] and "skipped" not in r])
              for st in result["states"]]
    states = [(st, rows) for st, rows in states if rows]
    if not states:  # interrupted before the first row finished, or nothing could run
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no rows were measured", ha="center")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return counts
    floors = {f for _, _, _, f in PLOT_PANELS}
    per_panel = [[r for r in rows if r.get("kind") == kind and r["row"] not in floors] for kind in ("save", "restore")
                 for st, rows in states[:1]]
    nmax = max(len(x) for x in per_panel) if per_panel else 1
    fig, axes = plt.subplots(len(states), len(PLOT_PANELS), squeeze=False,
                             figsize=(3.5 * len(PLOT_PANELS), 0.7 + (0.5 * nmax + 0.8) * len(states)),
                             gridspec_kw={"width_ratios": [1, 1, 0.8, 1]})
    methods: set[str] = set()
    for si, (st, rows) in enumerate(states):
        counts["states"] += 1
        for pi, (title, kind, field, floor_key) in enumerate(PLOT_PANELS):
            ax = axes[si][pi]
            counts["panels"] += 1
            color = _PANEL_COLORS[pi]
            items = [r for r in rows if r.get("kind") == kind and r["row"] not in floors]
            ax.set_title(f"{st['title'] if pi == 0 else ''}\n{title}", fontsize=9, loc="left")
            for sp in ("top", "right"):
                ax.spines[sp].set_visible(False)
            ax.set_yticks([])
            vals = [(r, r.get(field)) for r in items if measured(r) and isinstance(r.get(field), (int, float))]
            if not vals:
                ax.text(0.5, 0.5, "not measured by this run" + ("\n\nS3 uploads on a real server:\n"
                        "benchmarks/bench_s3.py" if field == "s3_s" else ""), ha="center", va="center",
                        fontsize=8, color="#636363", transform=ax.transAxes)
                ax.set_xticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
                continue
            ours = [r["row"].startswith("spotckpt") for r, _ in vals]
            ax.barh(range(len(vals)), [v for _, v in vals], height=0.42,
                    color=[color if o else color + "4d" for o in ours], edgecolor=color, linewidth=0.8)
            counts["bars"] += len(vals)
            methods.update(r["row"] for r, _ in vals)
            lows = [v for _, v in vals]
            floor = find(rows, st["key"], floor_key)
            fv = None
            if floor is not None:
                fv = floor.get("stall_s" if field == "stall_s" else "durable_s")
            if isinstance(fv, (int, float)):
                ax.axvline(fv, color="black", linestyle="--", linewidth=1)
                ax.text(0.0, -1.05, f"- - floor: {floor['label'].replace(' (floor)', '')}, {fv:.3g} s",  # type: ignore[index]
                        fontsize=7, va="center", ha="left", transform=ax.get_yaxis_transform())
                counts["floors"] += 1
                lows.append(fv)
            lo, hi = min(lows) / 2.5, max(lows) * 4.0
            ax.set_xscale("log")
            ax.set_xlim(lo, hi)
            for i, (r, v) in enumerate(vals):
                ax.text(lo * 1.05, i - 0.36, r["label"], fontsize=7.5, va="bottom", ha="left",
                        fontweight="bold" if ours[i] else "normal",
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.3, "alpha": 0.85})
                ax.text(v * 1.08, i, f"{v:.3g} s", va="center", fontsize=7)
            ax.set_ylim(len(vals) - 0.5, -1.35)
            ax.xaxis.set_major_locator(LogLocator(base=10))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=7.5)
            ax.grid(axis="x", which="major", alpha=0.3)
            if si == len(states) - 1:
                ax.set_xlabel("seconds (log)", fontsize=8)
    counts["methods"] = len(methods)
    m = result["machine"]
    fig.suptitle(f"Checkpoint save and restore per method: {m.get('gpu') or m.get('cpu_model')}, "
                 f"{m.get('cpu_count')} cores, torch {m.get('torch')} -- dashed: the physical floor; "
                 "bold, solid: spotckpt", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return counts


def write_outputs(result: dict[str, Any], out_dir: str, *, plot: bool = True,
                  json_too: bool = True) -> dict[str, str]:
    """Write ``save.json`` (unless ``json_too`` is False), ``save.md`` and ``save.png``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "save.json"), "md": os.path.join(out_dir, "save.md"),
             "png": os.path.join(out_dir, "save.png")}
    if json_too:
        with open(paths["json"], "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    else:
        del paths["json"]
    with open(paths["md"], "w") as f:
        f.write(render_markdown(result))
    if plot and plot_unavailable() is None:
        render_plot(result, paths["png"])
    else:
        del paths["png"]
    return paths


def plot_unavailable() -> str | None:
    """Why ``save.png`` cannot be drawn here (matplotlib is not importable), else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed, so no save.png: pip install 'spotckpt[bench]' (or matplotlib) "
                "for the picture, or pass --no-plot")
    return None


def progress_line(state_key: str, rec: dict[str, Any]) -> str:
    """One line per finished row, printed while the suite runs."""
    head = f"{state_key:24s} {rec['row']:26s}"
    if "skipped" in rec:
        return f"{head} skipped  {rec['skipped'][:120]}"
    if "error" in rec:
        return f"{head} n/a  {rec['error'][:120]}"
    return (f"{head} stall {rec['stall_s']:7.3f}s  durable {rec['durable_s']:7.3f}s  "
            f"{rec['gbps']:6.2f} GB/s  peakRSS+ {rec['peak_rss_delta_bytes'] / MIB:7.0f} MiB")
