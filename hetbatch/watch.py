"""`hetbatch status OUT --watch`: a terminal view of a job that refreshes until it ends or the
user presses Ctrl-C.

Rates come from the ledger (each commit's time and rows), so the view works for any job on any
store, local run or Slurm; when the job's coordinator answers, its view of which instances are
connected is shown too. The figures are computed by `snapshot` (pure: records and `now` in).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths

RATE_WINDOW_S = 30.0  # rates are over the last this many seconds of commits
MIN_SILENCE_S = 5.0  # an instance is "silent" after max(this, 3x its longest unit) without commits


@dataclass
class Rate:
    rows: int = 0
    tokens: int = 0
    rows_per_s: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class InstanceView:
    pool: str
    rows: int
    rate: Rate
    last_commit_ago_s: float
    state: str  # "working", "silent", "disconnected", "done"


@dataclass
class Snapshot:
    state: str
    rows_total: int
    rows_done: int
    total: Rate
    eta_s: float | None
    pools: dict[str, Rate] = field(default_factory=dict)
    instances: dict[str, InstanceView] = field(default_factory=dict)
    coordinator: str | None = None


def _rate(records: Sequence[CommitRecord], since: float, span: float) -> Rate:
    recent = [r for r in records if r.at >= since]
    rows = sum(r.row_count for r in recent)
    tokens = sum(r.completion_tokens for r in recent)
    return Rate(rows, tokens, rows / span if span > 0 else 0.0, tokens / span if span > 0 else 0.0)


def snapshot(
    records: Sequence[CommitRecord],
    rows_total: int,
    now: float,
    complete: bool,
    live: dict[str, Any] | None = None,
    window_s: float = RATE_WINDOW_S,
) -> Snapshot:
    """What the view shows at wall time `now`: rates over the last `window_s` seconds (or since
    the first lease of this run, if sooner)."""
    timed = [r for r in records if r.at > 0]
    if complete and timed:  # rates as they were at the end, not decaying afterwards
        now = max(r.at for r in timed)
    starts = [r.leased_at for r in timed if r.leased_at > 0]
    begun = min(starts) if starts else (min((r.at for r in timed), default=now))
    since = max(now - window_s, begun)
    span = now - since
    total = _rate(timed, since, span)
    done = sum(r.row_count for r in records)
    left = rows_total - done
    eta = left / total.rows_per_s if total.rows_per_s > 0 and not complete else None
    by_pool: dict[str, list[CommitRecord]] = {}
    by_instance: dict[str, list[CommitRecord]] = {}
    for r in timed:
        by_pool.setdefault(r.pool or "?", []).append(r)
        by_instance.setdefault(r.instance, []).append(r)
    live_instances = (live or {}).get("instances", {})
    connected = {name: bool(m.get("connected", True)) for name, m in live_instances.items()}
    instances = {}
    for name, recs in sorted(by_instance.items()):
        last = max(r.at for r in recs)
        longest = max((r.at - r.leased_at for r in recs if r.leased_at > 0), default=0.0)
        if complete:
            state = "done"
        elif connected.get(name) is False:
            state = "disconnected"
        elif now - last > max(MIN_SILENCE_S, 3 * longest):
            state = "silent"
        else:
            state = "working"
        instances[name] = InstanceView(
            pool=recs[0].pool or "?",
            rows=sum(r.row_count for r in recs),
            rate=_rate(recs, since, span),
            last_commit_ago_s=now - last,
            state=state,
        )
    for name, alive in connected.items():  # joined but nothing committed yet
        if name not in instances:
            pool = str(live_instances[name].get("pool", "?"))
            instances[name] = InstanceView(pool, 0, Rate(), float("inf"),
                                           "starting" if alive else "disconnected")
    return Snapshot(
        state="complete" if complete else "running",
        rows_total=rows_total,
        rows_done=done,
        total=total,
        eta_s=eta,
        pools={p: _rate(recs, since, span) for p, recs in sorted(by_pool.items())},
        instances=instances,
        coordinator=(live or {}).get("coordinator"),
    )


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds == float("inf"):
        return "–"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def render(output: str, snap: Snapshot) -> Any:
    """A rich renderable of the snapshot."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    pct = 100.0 * snap.rows_done / snap.rows_total if snap.rows_total else 100.0
    head = Text.assemble(
        (f"{output}  ", "bold"), (snap.state, "green" if snap.state == "complete" else "cyan"),
        f"   {snap.rows_done:,} of {snap.rows_total:,} rows ({pct:.1f}%)   "
        f"{snap.total.rows_per_s:,.1f} rows/s   {snap.total.tokens_per_s:,.0f} out tok/s   "
        f"ETA {_duration(snap.eta_s)}",
    )
    bar = ProgressBar(total=max(snap.rows_total, 1), completed=snap.rows_done, width=60)
    pools = Table(title=f"pools (last {RATE_WINDOW_S:.0f} s)", title_justify="left")
    for col in ("pool", "rows/s", "out tok/s"):
        pools.add_column(col, justify="left" if col == "pool" else "right")
    for name, r in snap.pools.items():
        pools.add_row(name, f"{r.rows_per_s:,.1f}", f"{r.tokens_per_s:,.0f}")
    insts = Table(title="instances", title_justify="left")
    for col in ("instance", "pool", "state", "rows", "rows/s", "out tok/s", "last commit"):
        insts.add_column(col, justify="left" if col in ("instance", "pool", "state") else "right")
    colour = {"working": "green", "done": "green", "starting": "cyan", "silent": "yellow",
              "disconnected": "red"}
    for name, v in snap.instances.items():
        insts.add_row(name, v.pool, Text(v.state, colour.get(v.state, "")), f"{v.rows:,}",
                      f"{v.rate.rows_per_s:,.1f}", f"{v.rate.tokens_per_s:,.0f}",
                      f"{_duration(v.last_commit_ago_s)} ago")
    foot = Text(
        (f"coordinator {snap.coordinator}   " if snap.coordinator else "")
        + "Ctrl-C to quit", style="dim")
    return Group(head, bar, Text(""), pools, insts, foot)


def watch_status(output: str, interval_s: float = 2.0) -> int:
    """Refresh the view every `interval_s` until the job completes or Ctrl-C; exit code 0."""
    from rich.console import Console
    from rich.live import Live

    from hetbatch.status import live_status

    store = OutputStore(output)
    if not store.exists():
        raise UserError(f"{output}: no hetbatch job has written here")
    rows_total = int(store.read_json(OutputPaths.JOB)["rows"])
    console = Console()
    try:
        with Live(console=console, auto_refresh=False, transient=False) as view:
            while True:
                complete = store.is_complete()
                live = None if complete else live_status(store, timeout_s=1.0)
                snap = snapshot(store.read_ledger(), rows_total, time.time(), complete, live)
                view.update(render(output, snap), refresh=True)
                if complete:
                    return 0
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0
