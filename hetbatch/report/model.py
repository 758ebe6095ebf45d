"""What a report shows, computed from a run's per-unit record: pure functions, no I/O.

A run (real or simulated) is reduced to `JobRun`: its units with lease and commit times in
seconds since the job started. Everything on the page is derived from that here, so a simulation
and a real run are measured by the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Unit:
    """One committed unit: rows [row0, row1) on `instance`, leased at `leased_s` (None when the
    record predates lease times) and committed at `committed_s`, seconds since the start."""

    instance: str
    pool: str
    row0: int
    row1: int
    leased_s: float | None
    committed_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    stolen: bool = False
    redealt: bool = False
    kept: int | None = None  # its output rows when it held only some of its range's

    @property
    def rows(self) -> int:
        return self.row1 - self.row0 if self.kept is None else self.kept


@dataclass(frozen=True)
class ErrorKind:
    kind: str
    count: int
    examples: tuple[tuple[str, str], ...]  # (row id, full message)


@dataclass
class JobRun:
    """Everything a report needs about one run."""

    title: str
    source: str  # "run" or "simulation"
    state: str  # "complete" or "in progress" (no _SUCCESS yet: running, or stopped)
    rows_total: int
    units: list[Unit]
    pool_of: dict[str, str]  # instance -> pool, for every instance that took part
    makespan_s: float
    planned_rates: dict[str, float] = field(default_factory=dict)  # pool -> output tokens/s
    pool_devices: dict[str, int] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)  # pool -> price per device-hour
    errors: list[ErrorKind] = field(default_factory=list)
    prompt_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    completion_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lengths_note: str = ""
    unrecorded_rows: int = 0  # rows committed without times (an older ledger, recovered shards)

    @property
    def pools(self) -> list[str]:
        return sorted(set(self.pool_of.values()))

    @property
    def instances(self) -> list[str]:
        return sorted(self.pool_of, key=lambda i: (self.pool_of[i], i))

    @cached_property
    def units_of(self) -> dict[str, list[Unit]]:
        """Units by instance (computed once: figures per instance stay O(units) in total)."""
        out: dict[str, list[Unit]] = {name: [] for name in self.pool_of}
        for u in self.units:
            out.setdefault(u.instance, []).append(u)
        return out


@dataclass(frozen=True)
class InstanceTime:
    """Where an instance's time went, in seconds, from the job's start to its end."""

    busy: float
    startup: float  # before its first lease: engine start-up (and waiting to be launched)
    waiting: float  # between its first lease and its last commit, holding no unit
    tail: float  # after its last commit, while others still worked


@dataclass(frozen=True)
class PoolTotals:
    instances: int
    rows: int
    units: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    measured_rate: float  # output tokens/s while the pool worked
    planned_rate: float | None
    cost: float | None


def merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of intervals, sorted and non-overlapping."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        elif b > a:
            out.append((a, b))
    return out


def spans(run: JobRun, instance: str) -> list[tuple[float, float]]:
    units = run.units_of.get(instance, [])
    return [(u.leased_s, u.committed_s) for u in units if u.leased_s is not None]


def instance_time(run: JobRun, instance: str) -> InstanceTime:
    busy = merged(spans(run, instance))
    if not busy:
        return InstanceTime(0.0, run.makespan_s, 0.0, 0.0)
    held = sum(b - a for a, b in busy)
    first, last = busy[0][0], busy[-1][1]
    return InstanceTime(
        busy=held,
        startup=first,
        waiting=(last - first) - held,
        tail=max(run.makespan_s - last, 0.0),
    )


def instance_rate(run: JobRun, instance: str) -> float:
    """Output tokens/s while the instance held work."""
    t = instance_time(run, instance)
    tokens = sum(u.completion_tokens for u in run.units_of.get(instance, []))
    return tokens / t.busy if t.busy > 0 else 0.0


def pool_totals(run: JobRun) -> dict[str, PoolTotals]:
    out = {}
    for pool in run.pools:
        units = [u for u in run.units if u.pool == pool]
        timed = [(u.leased_s, u.committed_s) for u in units if u.leased_s is not None]
        active = (max(b for _, b in timed) - min(a for a, _ in timed)) if timed else 0.0
        tokens = sum(u.completion_tokens for u in units)
        out[pool] = PoolTotals(
            instances=sum(1 for p in run.pool_of.values() if p == pool),
            rows=sum(u.rows for u in units),
            units=len(units),
            prompt_tokens=sum(u.prompt_tokens for u in units),
            completion_tokens=tokens,
            errors=sum(u.errors for u in units),
            measured_rate=tokens / active if active > 0 else 0.0,
            planned_rate=run.planned_rates.get(pool),
            cost=pool_cost(run, pool),
        )
    return out


def pool_cost(run: JobRun, pool: str) -> float | None:
    """Devices x hours the job held them x price per device-hour, when a price is known."""
    price = run.prices.get(pool)
    if price is None:
        return None
    return price * run.pool_devices.get(pool, 1) * run.makespan_s / 3600


def throughput_series(
    run: JobRun, bins: int = 60
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Output tokens/s over time per pool: each unit's tokens spread evenly from its lease to
    its commit (what a worker does between them), summed in equal time bins."""
    end = max(run.makespan_s, 1e-9)
    edges = np.linspace(0.0, end, bins + 1)
    width = edges[1] - edges[0]
    series = {}
    for pool in run.pools:
        units = [u for u in run.units if u.pool == pool and u.leased_s is not None]
        a = np.asarray([u.leased_s for u in units], dtype=float).reshape(-1, 1)
        b = np.maximum(np.asarray([u.committed_s for u in units], dtype=float).reshape(-1, 1),
                       a + 1e-9)
        tokens = np.asarray([u.completion_tokens for u in units], dtype=float).reshape(-1, 1)
        series[pool] = np.zeros(bins)
        for k in range(0, len(units), 20_000):  # in chunks: units x bins floats at a time
            part = slice(k, k + 20_000)
            overlap = np.clip(np.minimum(edges[1:], b[part]) - np.maximum(edges[:-1], a[part]),
                              0.0, None)
            series[pool] += (tokens[part] * overlap / (b[part] - a[part])).sum(axis=0) / width
    return (edges[:-1] + edges[1:]) / 2, series


def fluid_bound(run: JobRun) -> float:
    """The earliest the job's tokens could have been done if they had flowed freely to every
    instance from its first lease on, at the speed it really showed while working."""
    speeds = []
    for inst in run.pool_of:
        t = instance_time(run, inst)
        rate = instance_rate(run, inst)
        if rate > 0:
            speeds.append((t.startup, rate))
    work = float(sum(u.completion_tokens for u in run.units if u.leased_s is not None))
    if not speeds or work <= 0:
        return 0.0
    speeds.sort()
    done, cap = 0.0, 0.0
    for k, (up, rate) in enumerate(speeds):
        cap += rate
        nxt = speeds[k + 1][0] if k + 1 < len(speeds) else math.inf
        if done + cap * (nxt - up) >= work:
            return up + (work - done) / cap
        done += cap * (nxt - up)
    return math.inf


def efficiency(run: JobRun, bound: float | None = None) -> float | None:
    """Fluid bound over the makespan: 1.0 means no scheduler could have finished sooner."""
    bound = fluid_bound(run) if bound is None else bound
    if bound <= 0 or run.makespan_s <= 0:
        return None
    return bound / run.makespan_s


def totals(run: JobRun) -> dict[str, float]:
    rows = sum(u.rows for u in run.units)
    tokens = sum(u.completion_tokens for u in run.units)
    return {
        "rows": rows,
        "units": len(run.units),
        "prompt_tokens": sum(u.prompt_tokens for u in run.units),
        "completion_tokens": tokens,
        "errors": sum(u.errors for u in run.units),
        "output_tokens_per_s": tokens / run.makespan_s if run.makespan_s > 0 else 0.0,
        "stolen": sum(u.stolen for u in run.units),
        "redealt": sum(u.redealt for u in run.units),
    }
