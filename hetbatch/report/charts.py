"""The report's charts, drawn with matplotlib (no browser, no network): each one returned as
inline SVG for the page and, on request, also saved as PNG."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from hetbatch.report import model
from hetbatch.report.model import JobRun

# Figures are made without pyplot, so no global backend or state is touched.
STYLE = {"font.size": 9, "svg.fonttype": "none", "axes.spines.top": False,
         "axes.spines.right": False}


def pool_colours(run: JobRun) -> dict[str, str]:
    palette = matplotlib.colormaps["tab10"].colors
    return {p: matplotlib.colors.to_hex(palette[k % len(palette)])
            for k, p in enumerate(run.pools)}


def gantt(run: JobRun) -> Figure:
    """One row per instance, one bar per unit from lease to commit; hatched when its rows were
    stolen from another instance, outlined red when they were re-dealt after a lapsed lease."""
    colours = pool_colours(run)
    names = run.instances
    fig = Figure(figsize=(10, 1.2 + 0.35 * len(names)))
    ax = fig.subplots()
    row_of = {n: k for k, n in enumerate(names)}
    for u in run.units:
        if u.leased_s is None or u.instance not in row_of:
            continue
        ax.barh(
            row_of[u.instance], max(u.committed_s - u.leased_s, 1e-3), left=u.leased_s,
            height=0.7, color=colours.get(u.pool, "grey"), alpha=0.75,
            edgecolor="crimson" if u.redealt else "white",
            linewidth=1.5 if u.redealt else 0.4, hatch="///" if u.stolen else None,
        )
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, max(run.makespan_s, 1e-3))
    ax.set_xlabel("seconds since the job started")
    handles = [Patch(color=c, label=f"pool {p}") for p, c in colours.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="stolen"),
                Patch(facecolor="white", edgecolor="crimson", label="re-dealt")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def throughput(run: JobRun) -> Figure:
    """Measured output tokens/s per pool and in total, with the plan's prediction dashed."""
    colours = pool_colours(run)
    centres, series = model.throughput_series(run)
    fig = Figure(figsize=(10, 3.2))
    ax = fig.subplots()
    for pool, values in series.items():
        ax.plot(centres, values, color=colours[pool], label=f"{pool} measured")
        planned = run.planned_rates.get(pool)
        if planned:
            ax.axhline(planned, color=colours[pool], linestyle="--", linewidth=1,
                       label=f"{pool} planned")
    if len(series) > 1:
        ax.plot(centres, sum(series.values()), color="black", label="total measured")
        planned_total = sum(run.planned_rates.get(p, 0.0) for p in series)
        if planned_total:
            ax.axhline(planned_total, color="black", linestyle="--", linewidth=1,
                       label="total planned")
    ax.set_xlim(0, max(run.makespan_s, 1e-3))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the job started")
    ax.set_ylabel("output tokens/s")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


IDLE_PARTS = (("busy", "#4c72b0"), ("startup", "#bbbbbb"), ("waiting", "#dd8452"),
              ("tail", "#c44e52"))


def time_use(run: JobRun) -> Figure:
    """Each instance's busy time and where its idle time went."""
    names = run.instances
    fig = Figure(figsize=(10, 1.2 + 0.35 * len(names)))
    ax = fig.subplots()
    left = [0.0] * len(names)
    times = [model.instance_time(run, n) for n in names]
    for part, colour in IDLE_PARTS:
        widths = [getattr(t, part) for t in times]
        ax.barh(range(len(names)), widths, left=left, color=colour, height=0.7,
                label="start-up" if part == "startup" else part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def lengths(run: JobRun) -> Figure:
    fig = Figure(figsize=(10, 2.8))
    axes = fig.subplots(1, 2)
    for ax, values, what in ((axes[0], run.prompt_lengths, "prompt tokens"),
                             (axes[1], run.completion_lengths, "completion tokens")):
        if len(values):
            ax.hist(values, bins=min(40, max(len(set(values.tolist())), 1)), color="#4c72b0")
        ax.set_xlabel(what)
        ax.set_ylabel("rows")
    fig.tight_layout()
    return fig


CHARTS: dict[str, Callable[[JobRun], Figure]] = {
    "gantt": gantt,
    "throughput": throughput,
    "time-use": time_use,
    "lengths": lengths,
}


def render(run: JobRun, png_dir: str | None = None) -> dict[str, str]:
    """Every chart as SVG text, by name; also `<png_dir>/<name>.png` when asked."""
    if png_dir:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
    out = {}
    for name, draw in CHARTS.items():
        with matplotlib.rc_context(STYLE):
            fig = draw(run)
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        svg = buf.getvalue()
        out[name] = svg[svg.index("<svg"):]
        if png_dir:
            fig.savefig(Path(png_dir) / f"{name}.png", dpi=110)
    return out
