"""Heavy rows apart: with per-row needs known up front, heavy rows start early on fast instances."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import Lease, Scheduler, SchedulerConfig
from hetbatch.sim import RowWork, SimConfig, simulate
from tests.sim.helpers import CONFIG, cluster

UNLIMITED = 1 << 62


def test_summary_is_a_few_figures_of_the_job() -> None:
    needs = np.full(1000, 100)
    needs[[70, 650, 660]] = 5000
    bounds = RowBounds.from_rows(needs, block_rows=64)
    assert bounds.max_bound == 5000 and bounds.mean_bound == 114.7
    assert bounds.any_heavy and bounds.heavy_bound == 229
    assert bounds.heavy_ranges == ((64, 128), (640, 704))
    assert RowBounds.from_rows(needs[:999], block_rows=500).heavy_ranges == ((0, 999),)
    assert not RowBounds.from_rows(np.full(500, 7)).any_heavy


def _tail_heavy_job(rows: int = 4000) -> tuple[RowWork, RowBounds]:
    """Short rows, but one in 40 of the last tenth decodes 30x longer (and may, by its
    max_tokens): dealt in order, they are in the job's last units."""
    rng = np.random.default_rng(3)
    inputs = rng.integers(32, 96, rows)
    outputs = rng.integers(16, 48, rows)
    max_tokens = np.full(rows, 64)
    heavy = np.arange(rows - rows // 10, rows, 40)
    outputs[heavy], max_tokens[heavy] = 1000, 1024
    needs = inputs + max_tokens
    return RowWork(inputs, outputs, needs=needs), RowBounds.from_rows(needs, block_rows=64)


def _ran(work: RowWork, a) -> np.ndarray:
    """Which rows of a committed unit ran (instances of the test cluster hold any row)."""
    return work.rows_run(a.row0, a.row1, a.above, a.below, a.limit or UNLIMITED, False)


def runs_per_row(work: RowWork, result) -> np.ndarray:
    runs = np.zeros(work.rows, dtype=int)
    for a in result.assignments:
        runs[a.row0 : a.row1] += _ran(work, a)
    return runs


def _run(work: RowWork, bounds: RowBounds | None, committed=(), **sim):
    sched = Scheduler(work.rows, CONFIG, committed, bounds=bounds)
    return sched, simulate(sched, cluster(**sim.pop("faults", {})), work, SimConfig(**sim))


def _heavy_runs(work: RowWork, bounds: RowBounds, result) -> list:
    """(start time, instance) of every unit that ran a heavy row."""
    heavy = work.needs > bounds.heavy_bound
    return [(a.start, a.instance) for a in result.assignments
            if (heavy[a.row0 : a.row1] & _ran(work, a)).any()]


def test_heavy_rows_start_early_and_the_job_ends_sooner() -> None:
    work, bounds = _tail_heavy_job()
    _, blind = _run(work, None)
    _, known = _run(work, bounds)
    assert (runs_per_row(work, known) == 1).all()
    # Dealt in order, the last tenth's heavy rows start late; apart, in the job's first half.
    assert max(t for t, _ in _heavy_runs(work, bounds, blind)) > 0.6 * blind.makespan
    assert max(t for t, _ in _heavy_runs(work, bounds, known)) < 0.5 * known.makespan
    assert known.makespan < 0.85 * blind.makespan
    # Units of heavy rows only, over the heavy blocks; the light rows of those blocks apart.
    apart = [a for a in known.assignments if a.above == bounds.heavy_bound]
    assert apart and all(a.row0 >= bounds.heavy_ranges[0][0] for a in apart)
    light = [a for a in known.assignments if a.below == bounds.heavy_bound]
    assert sum(a.row1 - a.row0 for a in light) == sum(a.row1 - a.row0 for a in apart)


def test_exactly_once_with_losses_and_a_late_instance() -> None:
    work, bounds = _tail_heavy_job()
    _, result = _run(work, bounds, loss="timeout", faults={"lost_at": 20.0, "late_at": 10.0})
    assert result.completed and (runs_per_row(work, result) == 1).all()
    _, left = _run(work, bounds, faults={"lost_at": 60.0})
    assert left.completed and (runs_per_row(work, left) == 1).all()


@pytest.mark.parametrize("lost_at", [30.0, 60.0])
def test_heavy_rows_no_live_engine_holds_are_written_once_as_errors(lost_at: float) -> None:
    """The only engines that hold heavy rows are lost while theirs run: those heavy rows end
    as row errors on the others, each row once, the job complete."""
    work, bounds = _tail_heavy_job()
    big, small = 2000, 200
    assert work.needs[work.needs <= bounds.heavy_bound].max() <= small < bounds.heavy_bound
    insts = [replace(i, context=big, lost_at=lost_at) if i.instance_id.startswith("fast")
             else replace(i, context=small) for i in cluster()]
    context = {i.instance_id: i.context for i in insts}
    sched = Scheduler(work.rows, CONFIG, bounds=bounds)
    result = simulate(sched, insts, work, SimConfig())
    assert result.completed
    runs = np.zeros(work.rows, dtype=int)
    for a in result.assignments:
        runs[a.row0 : a.row1] += work.rows_run(
            a.row0, a.row1, a.above, a.below, context[a.instance], a.final
        )
    assert (runs == 1).all()
    assert any(a.final for a in result.assignments)


def test_resume_deals_only_the_rows_left() -> None:
    work, bounds = _tail_heavy_job()
    done = [(0, 1000), (2000, 2500), (3700, 3800)]
    sched, result = _run(work, bounds, committed=done)
    runs = runs_per_row(work, result)
    for a, b in done:
        runs[a:b] += 1
    assert (runs == 1).all()
    assert list(sched.committed) == [(0, work.rows)]


def test_heavy_rows_given_back_near_the_end_go_to_the_fastest() -> None:
    rows = 2000
    needs = np.full(rows, 100)
    needs[1500::50] = 4000
    bounds = RowBounds.from_rows(needs, block_rows=100)
    config = SchedulerConfig(min_unit_rows=8, max_unit_rows=10_000, heavy_pull=0.0)
    sched = Scheduler(rows, config, committed=[(0, 1500)], bounds=bounds)
    # "fast" turns rows around 4x sooner than "slow" (the same batch at 4x the rows/s).
    for name, weight in (("fast", 4.0), ("slow", 1.0), ("late", 1.0)):
        sched.join(name, weight, 0.0, concurrency=16)
    # Whole rows with heavy ones in them, given back when little is left: their heavy rows go
    # apart at once; "slow" would not finish one in time, "fast" would.
    lease = sched.request("late", 0.0)
    assert isinstance(lease, Lease) and lease.below == UNLIMITED and lease.start == 1500
    sched.leave("late", 1.0)
    slow = sched.request("slow", 1.0)
    assert isinstance(slow, Lease) and (slow.start, slow.above) == (1500, 0) and slow.split
    assert slow.below == bounds.heavy_bound and slow.end <= lease.end
    fast = sched.request("fast", 1.0)
    assert isinstance(fast, Lease) and fast.above == bounds.heavy_bound and fast.split
    assert (fast.start, fast.end) == (lease.start, lease.end)
