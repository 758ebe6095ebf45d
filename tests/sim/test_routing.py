"""Rows dealt by the context they need, in the simulator (the scheduler the coordinator runs)."""

from __future__ import annotations

import numpy as np

from hetbatch.scheduler.core import Scheduler
from hetbatch.sim import RowWork, SimConfig, SimInstance, SimResult, simulate
from tests.sim.helpers import CONFIG

SMALL, BIG = 1024, 4096


def _job(rows: int = 3000, too_long: int = 0) -> RowWork:
    """Prompts of ~200 tokens plus max_tokens 256; one row in 25 needs ~3,000 tokens, and
    `too_long` rows need more than any pool holds."""
    rng = np.random.default_rng(5)
    needs = rng.integers(300, 900, rows)
    long = rng.random(rows) < 0.04
    needs[long] = rng.integers(SMALL + 1, BIG, int(long.sum()))
    needs[rng.choice(rows, too_long, replace=False)] = BIG + 500
    outputs = rng.integers(16, 64, rows)
    return RowWork(needs - 256, outputs, needs=needs)


def _pools(big_lost_at: float | None = None) -> list[SimInstance]:
    small = [SimInstance(f"small-{i}", 300.0, 300.0, 16, context=SMALL) for i in range(3)]
    big = [SimInstance(f"big-{i}", 200.0, 200.0, 16, context=BIG) for i in range(2)]
    if big_lost_at is not None:
        big = [SimInstance(b.instance_id, 200.0, 200.0, 16, context=BIG, lost_at=big_lost_at)
               for b in big]
    return small + big


def _run(work: RowWork, insts: list[SimInstance], **sim) -> tuple[Scheduler, SimResult]:
    sched = Scheduler(work.rows, CONFIG)
    return sched, simulate(sched, insts, work, SimConfig(**sim))


def _runs_per_row(work: RowWork, insts: list[SimInstance], result: SimResult):
    """For each row: how many instances ran it (or wrote its error), and the largest context of
    those that did."""
    context = {i.instance_id: i.context for i in insts}
    runs = np.zeros(work.rows, dtype=int)
    held = np.zeros(work.rows, dtype=int)
    for a in result.assignments:
        ctx = context[a.instance]
        mask = work.rows_run(a.row0, a.row1, a.above, a.below, ctx, a.final)
        runs[a.row0 : a.row1] += mask
        held[a.row0 : a.row1] = np.where(mask, ctx, held[a.row0 : a.row1])
    return runs, held


def test_long_rows_run_only_where_they_fit_each_exactly_once() -> None:
    work, insts = _job(), _pools()
    sched, result = _run(work, insts)
    assert result.completed
    runs, held = _runs_per_row(work, insts, result)
    assert (runs == 1).all()
    assert (work.needs <= held).all(), "a row ran on an instance too small for it"
    small_rows = sum(s.rows for k, s in result.instances.items() if k.startswith("small"))
    assert small_rows > work.rows // 2, "the small pool did not take its share"
    assert not sched.long_rows


def test_rows_too_long_for_every_pool_are_written_once_as_errors() -> None:
    work, insts = _job(too_long=5), _pools()
    _, result = _run(work, insts)
    assert result.completed
    runs, _ = _runs_per_row(work, insts, result)
    assert (runs == 1).all()
    errors = {r for a in result.assignments if a.final for r in range(a.row0, a.row1)
              if work.needs[r] > BIG}
    assert len(errors) == 5


def test_long_rows_become_errors_when_the_big_pool_is_gone() -> None:
    work, insts = _job(), _pools(big_lost_at=3.0)
    _, result = _run(work, insts, loss="timeout")
    assert result.completed
    runs, _ = _runs_per_row(work, insts, result)
    assert (runs == 1).all()
    final = [a for a in result.assignments if a.final]
    assert final and all(a.instance.startswith("small") for a in final)
