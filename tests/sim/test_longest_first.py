"""Longest first near the end: with per-row bounds known, the end game deals heavy rows first."""

from __future__ import annotations

import numpy as np

from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import Scheduler
from hetbatch.sim import RowWork, SimConfig, simulate
from tests.sim.helpers import CONFIG, cluster


def test_summary_is_two_figures_of_the_job() -> None:
    needs = np.full(1000, 100)
    needs[[70, 650]] = 5000
    bounds = RowBounds.from_rows(needs)
    assert bounds.max_bound == 5000 and bounds.mean_bound == 109.8
    assert bounds.any_heavy and bounds.heavy_bound == 219
    assert not RowBounds.from_rows(np.full(500, 7)).any_heavy


def _tail_heavy_job(rows: int = 4000) -> tuple[RowWork, RowBounds]:
    """Short rows, but one in 40 of the last tenth decodes 30x longer: dealt in order, they
    are the job's last units."""
    rng = np.random.default_rng(3)
    inputs = rng.integers(32, 96, rows)
    outputs = rng.integers(16, 48, rows)
    max_tokens = np.full(rows, 64)
    heavy = np.arange(rows - rows // 10, rows, 40)
    outputs[heavy], max_tokens[heavy] = 1000, 1024
    needs = inputs + max_tokens
    return RowWork(inputs, outputs, needs=needs), RowBounds.from_rows(needs)


def runs_per_row(work: RowWork, result) -> np.ndarray:
    """How many times each row ran (instances of the test cluster hold any row)."""
    runs = np.zeros(work.rows, dtype=int)
    for a in result.assignments:
        top = a.limit or 1 << 62
        runs[a.row0 : a.row1] += work.rows_run(a.row0, a.row1, a.above, a.below, top, False)
    return runs


def _run(work: RowWork, bounds: RowBounds | None, committed=(), **sim):
    sched = Scheduler(work.rows, CONFIG, committed, bounds=bounds)
    return sched, simulate(sched, cluster(**sim.pop("faults", {})), work, SimConfig(**sim))


def test_near_the_end_slow_instances_hand_heavy_rows_to_fast_ones() -> None:
    work, bounds = _tail_heavy_job()
    _, known = _run(work, bounds)
    assert (runs_per_row(work, known) == 1).all()
    limited = [a for a in known.assignments if a.limit]
    assert any(a.instance.startswith("slow") for a in limited)
    heavy = work.needs > bounds.heavy_bound
    # Heavy rows of limited units were run elsewhere, as spans above the limit, by fast ones.
    for a in limited:
        assert not (heavy[a.row0 : a.row1] & work.rows_run(
            a.row0, a.row1, a.above, a.below, a.limit, False)).any()
    spans = [a for a in known.assignments if a.above >= bounds.heavy_bound]
    assert spans and all(a.instance.startswith("fast") for a in spans)


def test_exactly_once_with_losses_and_a_late_instance() -> None:
    work, bounds = _tail_heavy_job()
    _, result = _run(work, bounds, loss="timeout", faults={"lost_at": 20.0, "late_at": 10.0})
    assert result.completed and (runs_per_row(work, result) == 1).all()


def test_resume_deals_only_the_rows_left() -> None:
    work, bounds = _tail_heavy_job()
    done = [(0, 1000), (2000, 2500)]
    sched, result = _run(work, bounds, committed=done)
    runs = runs_per_row(work, result)
    for a, b in done:
        runs[a:b] += 1
    assert (runs == 1).all()
    assert list(sched.committed) == [(0, work.rows)]
