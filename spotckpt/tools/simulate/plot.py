"""``spotckpt simulate --plot FILE.png``: one picture of the job.

Left, on the job's timeline (seconds from the first ``Starting``):

- top: one horizontal bar per instance -- starting and restoring, training, the grace after
  SIGTERM (the final save) -- the waits for spot capacity between instances (hatched), each
  interruption (a red triangle: SIGTERM, with notice; a black cross: killed without notice) and
  the work it lost (red hatching: training time redone by the next instance);
- bottom: the step the trainer reached over time, each save (a tick), the moment each step
  became durable locally (a green dot) and in S3 (a blue diamond), the lost work shaded.

Right: the summary's figures. Everything comes from the :class:`~.summary.JobRecord` (the trainer's
events file) and the :func:`~.summary.summary` dict. matplotlib is imported lazily with the Agg
backend (no display needed); :func:`plot_unavailable` says why no picture can be drawn here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spotckpt.tools.simulate.summary import InstanceRecord, JobRecord, _time_at_step

__all__ = ["plot_job", "plot_unavailable", "Interruption", "interruptions_of"]

# colours (ColorBrewer-like, readable in print and for the common colour-vision deficiencies)
_START = "#c6dbef"  # starting, restoring
_TRAIN = "#3182bd"  # training
_GRACE = "#fdae6b"  # between SIGTERM and exit: the final save
_WAIT = "#bdbdbd"  # waiting for spot capacity
_LOST = "#de2d26"  # lost work
_LOCAL = "#31a354"  # durable locally
_S3 = "#08519c"  # durable in S3
_STEP = "#525252"  # steps trained


@dataclass(frozen=True)
class Interruption:
    """One interruption as drawn: ``instance`` (1-based) at ``t``; ``notice``: SIGTERM first
    (a spot notice) -- False: the instance was killed without one (no SIGTERM, no grace)."""

    instance: int
    t: float
    notice: bool = True


def plot_unavailable() -> str | None:
    """Why no picture can be drawn here (matplotlib is not importable), else None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed, so no picture: pip install 'spotckpt[bench]' (or matplotlib); "
                "the simulation ran without it")
    return None


def interruptions_of(job: JobRecord, notices: Sequence[bool] | None = None) -> list[Interruption]:
    """The job's interruptions in order. ``notices``: one flag per interruption (True: with
    notice); by default each instance's own ``notice`` attribute when it records one, else True."""
    hit = [i for i in job.instances if i.interrupted]
    out = []
    for k, inst in enumerate(hit):
        notice = notices[k] if notices is not None and k < len(notices) else bool(getattr(inst, "notice", True))
        t = inst.sigterm_s if inst.sigterm_s is not None else (inst.ended_s or inst.started_s)
        out.append(Interruption(inst.number, t, notice))
    return out


def _lost_span(inst: InstanceRecord, nxt: InstanceRecord | None) -> tuple[float, float] | None:
    """The training time of ``inst`` that ``nxt`` had to redo: from when ``inst`` reached the
    step ``nxt`` resumed from to its last progress; None when nothing was lost."""
    if nxt is None or not inst.progress:
        return None
    restored, reached = nxt.resumed_from, inst.last_step
    if restored is None or reached is None or restored >= reached:
        return None
    t_to = max(t for _, t in inst.progress)
    t_from = _time_at_step(inst.progress, restored)
    if t_from is None:
        t_from = inst.training_s if inst.training_s is not None else inst.started_s
    return (t_from, t_to) if t_to > t_from else None


def _summary_text(s: dict[str, Any], waits: float) -> str:
    def num(key: str, unit: str = " s") -> str:
        v = s.get(key)
        return "n/a" if v is None else f"{v:.1f}{unit}"

    lines = [
        f"outcome       {s.get('outcome') or '?'}",
        f"instances     {s.get('instances')}",
        f"interruptions {len(s.get('interruptions', []))}",
        f"final step    {s.get('final_step')}",
        "",
        f"TrainingTime  {num('TrainingTimeInSeconds')}",
        f"BillableTime  {num('BillableTimeInSeconds')}",
        f"savings       {num('savings_percent', ' %')}",
        f"  at spot price {s.get('spot_price_ratio', 0):g}x",
        "",
        f"lost work     {s.get('lost_steps_total', 0)} step(s)",
        f"              {s.get('lost_seconds_total', 0.0):.1f} s",
        f"capacity wait {waits:.1f} s",
    ]
    for k, it in enumerate(s.get("interruptions", []), 1):
        resume = it.get("downtime_seconds")
        lines.append("")
        lines.append(f"#{k} at step {it.get('step_at_interruption')}")
        lost = it.get("lost_steps")
        lines.append(f"   lost {'?' if lost is None else lost} step(s)")
        if resume is not None:
            lines.append(f"   training again {resume:.1f} s later")
    return "\n".join(lines)


def plot_job(job: JobRecord, s: dict[str, Any], path: str | os.PathLike[str], *,
             notices: Sequence[bool] | None = None) -> dict[str, int]:
    """Draw the job (see the module docstring) into ``path`` (PNG). ``s`` is ``summary(job)``;
    ``notices``: per interruption, whether it came with notice (see :func:`interruptions_of`).
    Returns how many of each element were drawn: ``instances`` (bars), ``interruptions``,
    ``saves``, ``durable_local``, ``durable_s3``, ``waits``, ``lost``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    instances = job.instances
    n = len(instances)
    end = max([job.end_s] + [i.ended_s or 0.0 for i in instances]) or 1.0
    hits = interruptions_of(job, notices)
    counts = {"instances": 0, "interruptions": 0, "saves": 0, "durable_local": 0, "durable_s3": 0, "waits": 0,
              "lost": 0}

    fig = plt.figure(figsize=(12, 3.2 + 0.35 * max(n, 1)), dpi=100)
    gs = fig.add_gridspec(2, 2, width_ratios=[3.9, 1], height_ratios=[0.5 + 0.35 * max(n, 1), 2.6],
                          hspace=0.08, wspace=0.03, left=0.085, right=0.985, top=0.86, bottom=0.11)
    top = fig.add_subplot(gs[0, 0])
    bottom = fig.add_subplot(gs[1, 0], sharex=top)
    side = fig.add_subplot(gs[:, 1])
    side.axis("off")

    # -- top: the instances ------------------------------------------------------------------
    h = 0.56
    for k, inst in enumerate(instances):
        y = inst.number
        stop = inst.ended_s if inst.ended_s is not None else end
        train = inst.training_s if inst.training_s is not None else stop
        sig = inst.sigterm_s if inst.sigterm_s is not None else stop
        top.broken_barh([(inst.started_s, max(0.0, train - inst.started_s))], (y - h / 2, h), color=_START)
        if sig > train:
            top.broken_barh([(train, sig - train)], (y - h / 2, h), color=_TRAIN)
        if stop > sig:
            top.broken_barh([(sig, stop - sig)], (y - h / 2, h), color=_GRACE)
        top.broken_barh([(inst.started_s, stop - inst.started_s)], (y - h / 2, h), facecolor="none",
                        edgecolor="#333333", linewidth=0.8)
        counts["instances"] += 1
        nxt = instances[k + 1] if k + 1 < n else None
        if nxt is not None and nxt.started_s > stop:
            top.broken_barh([(stop, nxt.started_s - stop)], (nxt.number - h / 4, h / 2), facecolor="white",
                            edgecolor=_WAIT, hatch="xxx", linewidth=0.6)
            bottom.axvspan(stop, nxt.started_s, color=_WAIT, alpha=0.25, linewidth=0)
            counts["waits"] += 1
        lost = _lost_span(inst, nxt) if inst.interrupted else None
        if lost is not None:
            top.broken_barh([(lost[0], lost[1] - lost[0])], (y - h / 2, h), facecolor="none", edgecolor=_LOST,
                            hatch="////", linewidth=0)
            bottom.axvspan(lost[0], lost[1], color=_LOST, alpha=0.13, linewidth=0)
            counts["lost"] += 1
    for it in hits:
        if it.notice:
            top.plot([it.t], [it.instance - h / 2 - 0.12], marker="v", color=_LOST, markersize=9, clip_on=False,
                     zorder=5)
            bottom.axvline(it.t, color=_LOST, linestyle="--", linewidth=1)
        else:
            top.plot([it.t], [it.instance], marker="X", color="black", markersize=10, zorder=5)
            bottom.axvline(it.t, color="black", linestyle="-", linewidth=1.2)
        counts["interruptions"] += 1
    top.set_ylim(n + 0.7, 0.3)
    top.set_yticks([i.number for i in instances])
    top.set_yticklabels([f"instance {i.number}" for i in instances], fontsize=9)
    top.tick_params(axis="x", labelbottom=False)
    top.grid(axis="x", alpha=0.3)
    for side_name in ("top", "right"):
        top.spines[side_name].set_visible(False)

    # -- bottom: steps, saves, durable ---------------------------------------------------------
    ymax = 1
    for inst in instances:
        pts = list(inst.progress)
        if inst.restored_step is not None and inst.training_s is not None:
            pts = [(inst.restored_step, inst.training_s)] + pts
        if pts:
            bottom.plot([t for _, t in pts], [st for st, _ in pts], color=_STEP, linewidth=1.6, zorder=3)
            ymax = max(ymax, max(st for st, _ in pts))
        for st, t in inst.saves:
            bottom.plot([t], [st], marker="|", color="black", markersize=11, markeredgewidth=1.3, zorder=4)
            counts["saves"] += 1
        for st, t in inst.durable_local:
            bottom.plot([t], [st], marker="o", color=_LOCAL, markersize=5.5, zorder=5, linestyle="none")
            counts["durable_local"] += 1
        for st, t in inst.durable_s3:
            bottom.plot([t], [st], marker="D", markerfacecolor="none", markeredgecolor=_S3, markersize=7.5,
                        markeredgewidth=1.4, zorder=6, linestyle="none")
            counts["durable_s3"] += 1
        ymax = max([ymax] + [st for st, _ in inst.saves])
    total = job.total_steps
    if total:
        bottom.axhline(total, color="#969696", linestyle=":", linewidth=1)
        ymax = max(ymax, total)
    bottom.set_ylim(0, ymax * 1.08)
    bottom.set_xlim(0, end * 1.01)
    bottom.set_xlabel("seconds since the job started (waits for capacity included)", fontsize=9)
    bottom.set_ylabel("step", fontsize=9)
    bottom.grid(alpha=0.3)
    for side_name in ("top", "right"):
        bottom.spines[side_name].set_visible(False)
    bottom.tick_params(labelsize=8)

    handles = [
        Patch(facecolor=_START, label="starting, restoring"),
        Patch(facecolor=_TRAIN, label="training"),
        Patch(facecolor=_GRACE, label="after SIGTERM (final save)"),
        Patch(facecolor="white", edgecolor=_WAIT, hatch="xxx", label="waiting for capacity"),
        Patch(facecolor=_LOST, alpha=0.35, label="lost work"),
        Line2D([], [], marker="v", color=_LOST, linestyle="none", markersize=8, label="interruption (SIGTERM)"),
        Line2D([], [], marker="X", color="black", linestyle="none", markersize=8, label="killed without notice"),
        Line2D([], [], color=_STEP, linewidth=1.6, label="step reached"),
        Line2D([], [], marker="|", color="black", linestyle="none", markersize=9, label="save"),
        Line2D([], [], marker="o", color=_LOCAL, linestyle="none", markersize=5, label="durable locally"),
        Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor=_S3, linestyle="none", markersize=6,
               label="durable in S3"),
    ]
    if not any(not it.notice for it in hits):
        handles = [x for x in handles if x.get_label() != "killed without notice"]
    fig.legend(handles=handles, loc="upper center", ncol=6, fontsize=8, frameon=False, bbox_to_anchor=(0.45, 0.955),
               handlelength=1.6, columnspacing=1.2)
    cmd = " ".join(job.command)
    cmd = cmd if len(cmd) <= 90 else cmd[:87] + "..."
    fig.suptitle(f"spotckpt simulate: {cmd}", x=0.085, ha="left", y=0.995, fontsize=10.5, fontweight="bold")

    waits = sum((b.started_s - (a.ended_s if a.ended_s is not None else b.started_s))
                for a, b in zip(instances, instances[1:]))
    side.text(0.08, 1.0, _summary_text(s, max(0.0, waits)), transform=side.transAxes, va="top", ha="left",
              family="monospace", fontsize=8.5,
              bbox={"boxstyle": "round,pad=0.6", "facecolor": "#f7f7f7", "edgecolor": "#d9d9d9"})
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return counts
