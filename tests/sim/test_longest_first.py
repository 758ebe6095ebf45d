"""Longest first near the end: with per-row bounds known, the end game deals heavy rows first."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import Scheduler
from hetbatch.scheduler.ranges import RangeSet
from hetbatch.sim import RowWork, SimConfig, simulate
from tests.sim.helpers import CONFIG, cluster, rows_exactly_once


def test_block_summary_finds_heavy_blocks_and_counts_light_rows() -> None:
    bounds = np.full(1000, 100)
    bounds[[70, 650, 651]] = 5000
    summary = RowBounds.from_rows(bounds, block_rows=64)
    assert summary.block_max.tolist()[:2] == [100, 5000]
    assert list(summary.heavy_ranges(RangeSet([(0, 1000)]))) == [(64, 128), (640, 704)]
    assert list(summary.heavy_ranges(RangeSet([(100, 660)]))) == [(100, 128), (640, 660)]
    # 16 blocks, two heavy; the last block is partial but counted whole.
    assert summary.light_rows(RangeSet([(0, 1000)])) == 14 * 64
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
    return RowWork(inputs, outputs), RowBounds.from_rows(max_tokens, block_rows=64)


def _run(work: RowWork, bounds: RowBounds | None, committed=(), **sim):
    sched = Scheduler(work.rows, CONFIG, committed, bounds=bounds)
    return sched, simulate(sched, cluster(**sim.pop("faults", {})), work, SimConfig(**sim))


def test_heavy_rows_go_first_and_the_job_ends_sooner() -> None:
    work, bounds = _tail_heavy_job()
    _, blind = _run(work, None)
    sched, known = _run(work, bounds)
    assert sched._heavy_first is not None, "the end game never began"
    assert rows_exactly_once(blind) and rows_exactly_once(known)
    assert known.makespan < 0.9 * blind.makespan
    # The rows that last entered hold no heavy row.
    last = max(known.assignments, key=lambda a: a.start)
    assert bounds.block_max[last.row0 // 64 : -(-last.row1 // 64)].max() <= 64


def test_exactly_once_with_losses_and_a_late_instance() -> None:
    work, bounds = _tail_heavy_job()
    _, result = _run(work, bounds, loss="timeout", faults={"lost_at": 20.0, "late_at": 10.0})
    assert result.completed and rows_exactly_once(result)


def test_resume_deals_only_the_rows_left() -> None:
    work, bounds = _tail_heavy_job()
    done = [(0, 1000), (2000, 2500)]
    sched, result = _run(work, bounds, committed=done)
    spans = sorted([*done, *((a.row0, a.row1) for a in result.assignments)])
    assert spans[0][0] == 0 and spans[-1][1] == work.rows
    assert all(a[1] == b[0] for a, b in pairwise(spans))
    assert list(sched.committed) == [(0, work.rows)]
