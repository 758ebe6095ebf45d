"""A simulated run as a `JobRun`, so `hetbatch simulate --report` draws the same page as a real
run's report and the two can be compared side by side."""

from __future__ import annotations

from collections.abc import Sequence

from hetbatch.report.model import JobRun, Unit
from hetbatch.sim.simulation import SimInstance, SimResult


def from_simulation(result: SimResult, instances: Sequence[SimInstance], title: str) -> JobRun:
    """Units from the simulator's assignments. The simulator counts work, not tokens per unit:
    each unit's tokens are its share of the job's simulated work, by rows."""
    pool_of = {i.instance_id: i.pool or i.instance_id for i in instances}
    per_row = result.total_work / max(result.total_rows, 1)
    units = [
        Unit(
            instance=a.instance,
            pool=pool_of.get(a.instance, "?"),
            row0=a.row0,
            row1=a.row1,
            leased_s=a.start,
            committed_s=a.end,
            completion_tokens=round(per_row * (a.row1 - a.row0)),
        )
        for a in result.assignments
    ]
    planned: dict[str, float] = {}
    for i in instances:
        planned[pool_of[i.instance_id]] = planned.get(pool_of[i.instance_id], 0.0) + (
            i.planned_weight
        )
    return JobRun(
        title=f"{title} (simulated)",
        source="simulation",
        state="complete" if result.completed else "incomplete",
        rows_total=result.total_rows,
        units=units,
        pool_of=pool_of,
        makespan_s=result.makespan,
        planned_rates=planned,
        lengths_note="the simulator samples lengths; it keeps no per-row output",
    )
