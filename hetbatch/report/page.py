"""The report as one self-contained HTML page: inline SVG charts and plain tables, no script,
no external resource, so it opens anywhere offline and can be mailed or archived as it is.

Figures carry `data-key` attributes so tools (and tests) can read them back from the page.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable

from hetbatch import __version__
from hetbatch.report import model
from hetbatch.report.model import JobRun

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#222;
padding:0 16px}
h1{font-size:22px;margin-bottom:2px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;
padding:8px 14px;min-width:130px}.card b{display:block;font-size:20px}
.card span{color:#666;font-size:12px}.chart svg{max-width:100%;height:auto}
.note{color:#666;font-size:12px}code{font-size:12px;white-space:pre-wrap}
"""


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _td(value: str, key: str | None = None, raw: float | None = None) -> str:
    attrs = f' data-key="{key}"' if key else ""
    if raw is not None:
        attrs += f' data-value="{raw!r}"'
    return f"<td{attrs}>{html.escape(value)}</td>"


def _table(head: Iterable[str], rows: Iterable[str]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def _card(label: str, value: str, key: str, raw: float | None) -> str:
    attr = f' data-value="{raw!r}"' if raw is not None else ""
    return (f'<div class="card"><b data-key="{key}"{attr}>{html.escape(value)}</b>'
            f"<span>{html.escape(label)}</span></div>")


def render_page(run: JobRun, charts: dict[str, str]) -> str:
    t = model.totals(run)
    bound = model.fluid_bound(run)
    eff = model.efficiency(run, bound)
    pools = model.pool_totals(run)
    costs = [p.cost for p in pools.values() if p.cost is not None]
    total_cost = sum(costs) if costs and len(costs) == len(pools) else None
    per_million = (total_cost / (t["completion_tokens"] / 1e6)
                   if total_cost is not None and t["completion_tokens"] else None)
    cards = [
        _card("state", run.state, "state", None),
        _card(f"rows of {run.rows_total:,}", _fmt(t["rows"] + run.unrecorded_rows), "rows",
              t["rows"] + run.unrecorded_rows),
        _card("seconds (makespan)", _fmt(run.makespan_s, 1), "makespan_s", run.makespan_s),
        _card("output tokens", _fmt(t["completion_tokens"]), "completion_tokens",
              t["completion_tokens"]),
        _card("output tokens/s", _fmt(t["output_tokens_per_s"]), "output_tokens_per_s",
              t["output_tokens_per_s"]),
        _card("scheduling efficiency (fluid bound / makespan)",
              "–" if eff is None else f"{eff:.3f}", "efficiency", eff),
        _card("rows with an error", _fmt(t["errors"]), "errors", t["errors"]),
        _card("units (stolen / re-dealt)",
              f"{t['units']:,} ({t['stolen']:,} / {t['redealt']:,})", "units", t["units"]),
    ]
    if total_cost is not None:
        cards.append(_card("cost", f"{total_cost:,.2f}", "cost", total_cost))
        cards.append(_card("cost per million output tokens", _fmt(per_million, 3),
                           "cost_per_million", per_million))
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>hetbatch report: {html.escape(run.title)}</title><style>{STYLE}</style></head>",
        f"<body><h1>hetbatch report: {html.escape(run.title)}</h1>",
        f'<p class="sub" data-key="source">{html.escape(run.source)} · generated {generated} · '
        f"hetbatch {__version__}</p>",
        f'<div class="cards">{"".join(cards)}</div>',
        f'<p class="note">Fluid bound {_fmt(bound, 1)} s: the soonest the job\'s output tokens '
        "could have been done had they flowed freely to every instance from its first lease on, "
        "at the speed each really showed while working."
        + (f" {run.unrecorded_rows:,} rows were committed without lease times "
           "(an older ledger or recovered shards) and are not drawn." if run.unrecorded_rows
           else "") + "</p>",
        "<h2>Units per instance</h2>",
        '<p class="note">Each bar is one unit, from its lease to its commit, coloured by pool; '
        "hatched: its rows were stolen from a slower instance; red outline: re-dealt after a "
        "lease lapsed or its instance left.</p>",
        f'<div class="chart" id="chart-gantt">{charts["gantt"]}</div>',
        "<h2>Output tokens/s</h2>",
        '<p class="note">Measured: each unit\'s tokens spread over its lease-to-commit time. '
        "Dashed: the plan's prediction (from the job's plan, where one was made).</p>",
        f'<div class="chart" id="chart-throughput">{charts["throughput"]}</div>',
        "<h2>By pool</h2>",
        _pool_table(pools),
        "<h2>Where each instance's time went</h2>",
        '<p class="note">Start-up: before its first lease. Waiting: between units, holding '
        "none. Tail: after its last commit, while others still worked.</p>",
        f'<div class="chart" id="chart-time-use">{charts["time-use"]}</div>',
        _instance_table(run),
        "<h2>Errors</h2>",
        _error_table(run),
        "<h2>Prompt and completion lengths</h2>",
        f'<p class="note">{html.escape(run.lengths_note)}</p>',
        f'<div class="chart" id="chart-lengths">{charts["lengths"]}</div>',
        "</body></html>",
    ]
    return "\n".join(parts)


def _pool_table(pools: dict[str, model.PoolTotals]) -> str:
    rows = []
    for name, p in pools.items():
        per_m = p.cost / (p.completion_tokens / 1e6) if p.cost and p.completion_tokens else None
        ratio = p.measured_rate / p.planned_rate if p.planned_rate else None
        rows.append(
            f'<tr data-pool="{html.escape(name)}">' + _td(name)
            + _td(str(p.instances), "instances", p.instances)
            + _td(_fmt(p.rows), "rows", p.rows) + _td(_fmt(p.units), "units", p.units)
            + _td(_fmt(p.prompt_tokens), "prompt_tokens", p.prompt_tokens)
            + _td(_fmt(p.completion_tokens), "completion_tokens", p.completion_tokens)
            + _td(_fmt(p.measured_rate), "measured_rate", p.measured_rate)
            + _td(_fmt(p.planned_rate), "planned_rate", p.planned_rate)
            + _td("–" if ratio is None else f"{ratio:.2f}", "measured_over_planned", ratio)
            + _td(_fmt(p.errors), "errors", p.errors)
            + _td(_fmt(p.cost, 2), "cost", p.cost) + _td(_fmt(per_m, 3), "cost_per_million",
                                                          per_m)
            + "</tr>"
        )
    return _table(["pool", "instances", "rows", "units", "prompt tokens", "output tokens",
                   "measured out tok/s", "planned out tok/s", "measured / planned", "errors",
                   "cost", "cost / M out tokens"], rows)


def _instance_table(run: JobRun) -> str:
    rows = []
    for name in run.instances:
        units = run.units_of.get(name, [])
        t = model.instance_time(run, name)
        rows.append(
            f'<tr data-instance="{html.escape(name)}">' + _td(name) + _td(run.pool_of[name])
            + _td(_fmt(sum(u.rows for u in units)), "rows", sum(u.rows for u in units))
            + _td(str(len(units)), "units", len(units))
            + _td(_fmt(sum(u.completion_tokens for u in units)), "completion_tokens",
                  sum(u.completion_tokens for u in units))
            + _td(_fmt(model.instance_rate(run, name)), "rate", model.instance_rate(run, name))
            + "".join(_td(_fmt(getattr(t, k), 1), k, getattr(t, k))
                      for k in ("busy", "startup", "waiting", "tail"))
            + _td(str(sum(u.stolen for u in units)), "stolen")
            + _td(str(sum(u.redealt for u in units)), "redealt")
            + "</tr>"
        )
    return _table(["instance", "pool", "rows", "units", "output tokens", "out tok/s busy",
                   "busy s", "start-up s", "waiting s", "tail s", "stolen", "re-dealt"], rows)


def _error_table(run: JobRun) -> str:
    if not run.errors:
        return '<p data-key="no-errors">No row has an error.</p>'
    rows = []
    for e in run.errors:
        examples = "<br>".join(
            f"<code>{html.escape(rid)}: {html.escape(msg[:300])}</code>" for rid, msg in e.examples
        )
        rows.append(f"<tr>{_td(e.kind)}{_td(_fmt(e.count), 'error_count', e.count)}"
                    f'<td style="text-align:left">{examples}</td></tr>')
    return _table(["kind", "rows", "example rows"], rows)
