"""The report's charts, drawn with matplotlib (no browser, no network): each one returned as
inline SVG for the page and, on request, also saved as PNG."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.collections import PolyCollection
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


MAX_LABELLED_ROWS = 60  # more instances than this: no name per row
MAX_VECTOR_UNITS = 3000  # more units than this: the bars are drawn as an image in the SVG


def _row_height(rows: int) -> float:
    """Figure height for one row per instance, capped so a huge cluster still renders."""
    return min(1.2 + 0.35 * rows, 30.0)


def _bars(ax: Any, lefts: list[float], widths: list[float], rows: list[int], **style: Any) -> None:
    """Horizontal bars as one collection (fast for many thousands of bars)."""
    x0 = np.asarray(lefts, dtype=float)
    x1 = x0 + np.asarray(widths, dtype=float)
    y0 = np.asarray(rows, dtype=float) - 0.35
    y1 = y0 + 0.7
    verts = np.stack([np.stack(c, axis=1) for c in ((x0, y0), (x0, y1), (x1, y1), (x1, y0))],
                     axis=1)
    ax.add_collection(PolyCollection(verts, **style))


def gantt(run: JobRun) -> Figure:
    """One row per instance, one bar per unit from lease to commit; hatched when its rows were
    stolen from another instance, outlined red when they were re-dealt after a lapsed lease."""
    colours = pool_colours(run)
    names = run.instances
    fig = Figure(figsize=(10, _row_height(len(names))))
    ax = fig.subplots()
    groups: dict[tuple[str, bool, bool], tuple[list[float], list[float], list[int]]] = {}
    for k, name in enumerate(names):
        for u in run.units_of.get(name, []):
            if u.leased_s is not None:
                lefts, widths, rows = groups.setdefault((u.pool, u.stolen, u.redealt),
                                                        ([], [], []))
                lefts.append(u.leased_s)
                widths.append(max(u.committed_s - u.leased_s, 1e-3))
                rows.append(k)
    raster = len(run.units) > MAX_VECTOR_UNITS
    for (pool, stolen, redealt), (lefts, widths, rows) in groups.items():
        _bars(ax, lefts, widths, rows, facecolors=colours.get(pool, "grey"), alpha=0.75,
              edgecolors="crimson" if redealt else "white", linewidths=1.5 if redealt else 0.4,
              hatch="///" if stolen else None, rasterized=raster)
    _instance_axis(ax, names)
    ax.set_xlim(0, max(run.makespan_s, 1e-3))
    ax.set_xlabel("seconds since the job started")
    handles = [Patch(color=c, label=f"pool {p}") for p, c in colours.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch="///", label="stolen"),
                Patch(facecolor="white", edgecolor="crimson", label="re-dealt")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _instance_axis(ax: Any, names: list[str]) -> None:
    if len(names) <= MAX_LABELLED_ROWS:
        ax.set_yticks(range(len(names)), names)
    else:
        ax.set_ylabel(f"{len(names):,} instances, by pool")
        ax.set_yticks([])
    ax.set_ylim(len(names) - 0.5, -0.5)


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
    fig = Figure(figsize=(10, _row_height(len(names))))
    ax = fig.subplots()
    left = np.zeros(len(names))
    times = [model.instance_time(run, n) for n in names]
    rows = list(range(len(names)))
    for part, colour in IDLE_PARTS:
        widths = np.asarray([getattr(t, part) for t in times])
        _bars(ax, list(left), list(widths), rows, facecolors=colour, edgecolors="none",
              rasterized=len(names) > MAX_LABELLED_ROWS)
        left += widths
    _instance_axis(ax, names)
    ax.set_xlim(0, max(float(left.max(initial=0.0)), 1e-3) * 1.02)
    ax.set_xlabel("seconds")
    handles = [Patch(color=c, label="start-up" if p == "startup" else p) for p, c in IDLE_PARTS]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
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
