"""Small scenarios shared by the simulator tests."""

from __future__ import annotations

from itertools import pairwise

import numpy as np

from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import make_scheduler
from hetbatch.sim import LengthDist, RowWork, SimConfig, SimInstance, SimResult, simulate

CONFIG = SchedulerConfig(min_unit_rows=8, max_unit_rows=256, lease_timeout_s=20.0)


def cluster(lost_at: float | None = None, late_at: float | None = None) -> list[SimInstance]:
    insts = [SimInstance(f"fast-{i}", 300.0, 300.0, 16) for i in range(2)]
    insts += [SimInstance(f"slow-{i}", 100.0, 100.0, 16) for i in range(3)]
    if lost_at is not None:
        insts[0] = SimInstance("fast-0", 300.0, 300.0, 16, lost_at=lost_at)
        insts[3] = SimInstance("slow-1", 100.0, 100.0, 16, lost_at=lost_at / 2)
    if late_at is not None:
        insts.append(SimInstance("late-0", 200.0, 200.0, 16, join_at=late_at))
    return insts


def workload(rows: int = 3000, seed: int = 1, tail: float = 0.0) -> RowWork:
    rng = np.random.default_rng(seed)
    return RowWork.sample(rows, rng, LengthDist(64), LengthDist(32, tail_frac=tail))


def run(policy: str, insts: list[SimInstance], work: RowWork, **sim) -> SimResult:
    sched = make_scheduler(policy, work.rows, CONFIG)
    return simulate(sched, insts, work, SimConfig(**sim))


def rows_exactly_once(result: SimResult) -> bool:
    spans = sorted((a.row0, a.row1) for a in result.assignments)
    tiled = all(a[1] == b[0] for a, b in pairwise(spans))
    return bool(spans) and spans[0][0] == 0 and spans[-1][1] == result.total_rows and tiled
