"""Scheduling policies side by side in the simulator: efficiency, and throughput vs hetbatch.

Efficiency is the fluid lower bound (all work spread over all capacity while it is up) over the
makespan. Instance speeds and batch limits come from the planner's plan for Llama-3.1-8B.

    python bench/scheduling.py [--hours 2] [--quick] [--seed N] [--skip-scale | --only-scale]
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import click
import numpy as np

from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import POLICIES, make_scheduler
from hetbatch.sim import LengthDist, RowWork, SimConfig, SimInstance, SimResult, simulate

# Output lengths stop at max_tokens as in any real job (4x the median here); scenario (e) lifts
# the cap for its heavy tail.
INPUT, OUTPUT = LengthDist(512, 0.6), LengthDist(256, 0.6, maximum=1024)
ACCELERATORS = ("H100", "A100", "L40S", "A10G")


@dataclass(frozen=True)
class Scenario:
    name: str
    instances: list[SimInstance]
    work: RowWork
    sim: SimConfig = field(default_factory=SimConfig)
    bounds: RowBounds | None = None  # per-row work known up front (max_tokens per row)


def planned_pools() -> dict[str, tuple[float, int]]:
    """Per accelerator: (output tokens/s per instance, max_num_seqs) from the planner."""
    pools = [PoolRequest(a.lower(), a, 8) for a in ACCELERATORS]
    plan = plan_cluster(load_model_profile("llama-3.1-8b"), pools, Workload(512, 1024, 256))
    return {p.pool.upper(): (p.capacity_weight, p.config.max_num_seqs) for p in plan.pools}


def nodes(pools: dict, kind: str, count: int, per_node: int = 8) -> list[SimInstance]:
    speed, seqs = pools[kind]
    name = kind.lower()
    return [
        SimInstance(f"{name}-{n}-{k}", speed, speed, seqs, pool=name)
        for n in range(count)
        for k in range(per_node)
    ]


def misestimated(insts: list[SimInstance], rng: np.random.Generator) -> list[SimInstance]:
    """Actual speed = planned x U(0.5, 1.5): every estimate off by up to 50%."""
    return [replace(i, speed=i.planned_weight * rng.uniform(0.5, 1.5)) for i in insts]


def with_losses(insts: list[SimInstance], at: float, late_at: float) -> list[SimInstance]:
    """Every fourth instance lost at `at`; one more of the fastest kind joins at `late_at`."""
    out = [replace(i, lost_at=at) if k % 4 == 3 else i for k, i in enumerate(insts)]
    return [*out, replace(insts[0], instance_id="late-0", join_at=late_at)]


def rows_for(insts: list[SimInstance], hours: float, rng: np.random.Generator) -> int:
    """Rows that keep `insts` busy for `hours` at their actual speed (the fluid bound)."""
    probe = RowWork.sample(20_000, rng, INPUT, OUTPUT)
    per_row = probe.total / probe.rows
    return int(hours * 3600 * sum(i.speed for i in insts) / per_row)


def scenarios(seed: int, hours: float) -> list[Scenario]:
    """Each job sized so that the cluster needs `hours` at full speed: huge offline jobs, where
    the unavoidable drain of the last requests is a small part of the makespan."""
    pools = planned_pools()
    rng = np.random.default_rng(seed)
    two = nodes(pools, "H100", 1) + nodes(pools, "L40S", 1)
    four = [i for a in ACCELERATORS for i in nodes(pools, a, 2)]
    work_two = RowWork.sample(rows_for(two, hours, rng), rng, INPUT, OUTPUT)
    work_four = RowWork.sample(rows_for(four, hours, rng), rng, INPUT, OUTPUT)
    half = _fluid(four, work_four) / 2
    heavy = replace(OUTPUT, tail_frac=0.005, tail_mult=20, maximum=None)
    tail = RowWork.sample(work_two.rows, rng, INPUT, heavy)
    # Its own generator: the scenarios before it draw exactly as they always did.
    known, bounds = known_max_tokens(work_two.rows, np.random.default_rng(seed + 1), heavy)
    return [
        Scenario("a: 2 nodes, 3:1", two, work_two),
        Scenario("b: 4 types, 8 nodes", four, work_four),
        Scenario("c: (a), estimates +-50%", misestimated(two, rng), work_two),
        Scenario("d: (b), 1/4 lost, 1 late", with_losses(four, half, half / 2), work_four,
                 SimConfig(loss="timeout")),
        Scenario("e: heavy-tailed outputs", two, tail),
        Scenario("e2: (e), max_tokens per row", two, known, bounds=bounds),
    ]


def known_max_tokens(
    rows: int, rng: np.random.Generator, heavy: LengthDist
) -> tuple[RowWork, RowBounds]:
    """(e)'s rows with a per-row max_tokens the job knows: 8,192 for the long requests (one in
    200, 5,120 tokens), 2,048 for the others, whose outputs it caps (about 1 in 4,000). A row's
    need is its prompt plus its max_tokens."""
    inputs = INPUT.sample(rng, rows)
    body = replace(heavy, tail_frac=0.0).sample(rng, rows)
    long = rng.random(rows) < heavy.tail_frac
    max_tokens = np.where(long, 8192, 2048)
    outputs = np.minimum(np.where(long, int(heavy.median * heavy.tail_mult), body), max_tokens)
    needs = inputs + max_tokens
    return RowWork(inputs, outputs, needs=needs), RowBounds.from_rows(needs)


def _fluid(insts: list[SimInstance], work: RowWork) -> float:
    return work.total / sum(i.speed for i in insts)


def run_policy(policy: str, sc: Scenario) -> SimResult:
    sched = make_scheduler(policy, sc.work.rows, SchedulerConfig(), bounds=sc.bounds)
    return simulate(sched, sc.instances, sc.work, sc.sim)


def table(seed: int, hours: float, echo: Callable[[str], None]) -> None:
    head = f"{'scenario':28s}" + "".join(f"{p:>22s}" for p in POLICIES)
    echo("efficiency (lower bound / makespan); in brackets: throughput relative to hetbatch")
    echo(head)
    for sc in scenarios(seed, hours):
        results = {p: run_policy(p, sc) for p in POLICIES}
        base = results["hetbatch"].makespan
        cells = []
        for p in POLICIES:
            r = results[p]
            assert r.completed, f"{p} did not finish {sc.name}"
            cells.append(f"{r.efficiency:.3f} ({base / r.makespan:5.2f}x)")
        echo(f"{sc.name:28s}" + "".join(f"{c:>22s}" for c in cells))
        gain = results["round-robin"].makespan / base - 1
        echo(f"{'':28s}hetbatch over round-robin: {gain:+.1%}")


def routed(seed: int, hours: float, echo: Callable[[str], None]) -> None:
    """(h): pools of different contexts. The H100 node's engines hold 32k tokens, the L40S
    node's 8k; one row in 20 has a ~12k-token prompt. hetbatch deals every row to an instance
    whose context holds it (the L40S workers hand long rows back); without routing, only the
    H100 node could run this job without losing rows."""
    pools = planned_pools()
    rng = np.random.default_rng(seed + 7)
    big = [replace(i, context=32768) for i in nodes(pools, "H100", 1)]
    small = [replace(i, context=8192) for i in nodes(pools, "L40S", 1)]
    rows = rows_for(big + small, hours, rng)
    inputs = INPUT.sample(rng, rows)
    long = rng.random(rows) < 0.05
    inputs[long] = LengthDist(12_000, 0.2, maximum=30_000).sample(rng, int(long.sum()))
    outputs = OUTPUT.sample(rng, rows)
    work = RowWork(inputs, outputs, needs=inputs + (OUTPUT.maximum or 0))
    sched = make_scheduler("hetbatch", rows, SchedulerConfig())
    both = simulate(sched, big + small, work)
    alone = simulate(make_scheduler("hetbatch", rows, SchedulerConfig()), big, work,
                     SimConfig(record=False))
    speed = {i.instance_id: i.speed for i in big + small}
    long_work = float(np.sum((np.diff(work._prefix))[work.needs > 8192]))
    bound = max(work.total / sum(speed.values()), long_work / sum(i.speed for i in big))
    small_rows = sum(v.rows for k, v in both.instances.items() if k.startswith("l40s"))
    misrouted = sum(  # long rows an L40S ran: must be none
        int(np.sum(ran & (work.needs[a.row0 : a.row1] > 8192)))
        for a in both.assignments if a.instance.startswith("l40s")
        for ran in [work.rows_run(a.row0, a.row1, a.above, a.below, 8192, a.final)]
    )
    echo(
        f"h: contexts 32k (H100) and 8k (L40S), 5% of rows need >8k: efficiency "
        f"{bound / both.makespan:.3f} (target 0.95), {alone.makespan / both.makespan:.2f}x the "
        f"H100 node alone; the L40S ran {small_rows / rows:.1%} of the rows, {misrouted} long"
    )


def large_cluster(instances: int) -> list[SimInstance]:
    """`instances` instances, the four types in equal numbers of 8-instance nodes."""
    per_kind = math.ceil(instances / (8 * len(ACCELERATORS)))
    pools = planned_pools()
    return [i for a in ACCELERATORS for i in nodes(pools, a, per_kind)][:instances]


def _status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in KiB."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def _reset_peak_rss() -> int:
    """Start measuring the peak resident memory afresh; the resident memory now, in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size
    return _status_kib("VmRSS")


def run_large(
    name: str, insts: list[SimInstance], work: RowWork, sim: SimConfig, echo: Callable[[str], None]
) -> None:
    """hetbatch alone on a large cluster: efficiency, the scheduler's decisions/s (CPU time
    spent inside its calls), and how much the process's peak resident memory grows during the
    simulation (scheduler and simulated instances; the workload's row lengths exist before)."""
    sched = make_scheduler("hetbatch", work.rows, SchedulerConfig())
    rss0 = _reset_peak_rss()
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = simulate(sched, insts, work, sim)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    grown = (_status_kib("VmHWM") - rss0) * 1024
    units = sum(s.units for s in result.instances.values())
    echo(
        f"{name}: {len(insts):,} instances, {work.rows:,} rows "
        f"({result.lower_bound / 3600:.2f} h at full speed): efficiency {result.efficiency:.3f}\n"
        f"   {result.scheduler_calls:,} scheduler calls at "
        f"{result.scheduler_calls / result.scheduler_s:,.0f}/s (CPU time in its calls); "
        f"whole simulation {wall:.0f} s ({cpu:.0f} s CPU, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)\n"
        f"   {units:,} units, {len(sched.committed)} committed ranges; peak resident memory "
        f"grew {grown / 2**20:.1f} MiB ({grown / max(units, 1):,.0f} B per unit)"
    )


def scale(seed: int, quick: bool, hours: float, echo: Callable[[str], None]) -> None:
    """(f): a thousand instances, ten million rows (about 16 minutes of work for them), then
    the same cluster with a job sized by hours like (a)-(e), hetbatch only."""
    insts = large_cluster(96 if quick else 1000)
    rows = 1_000_000 if quick else 10_000_000
    rng = np.random.default_rng(seed)
    work = RowWork.sample(rows, rng, INPUT, OUTPUT)
    run_large("f", insts, work, SimConfig(record=False), echo)
    long_job = RowWork.tiled(rows_for(insts, hours, rng), work)
    run_large(f"f, {hours:g} h", insts, long_job, SimConfig(record=False), echo)


def huge(seed: int, quick: bool, heartbeat_s: float, echo: Callable[[str], None]) -> None:
    """(g): ten thousand instances of four types, a billion rows. Every row has its own
    lengths, repeating a sample of 2^22 rows (units are far smaller), and the simulation steps
    unit by unit; instances heartbeat every `heartbeat_s`, as a job of this size would set."""
    insts = large_cluster(1000 if quick else 10_000)
    rows = 10**8 if quick else 10**9
    block = RowWork.sample(2**22, np.random.default_rng(seed), INPUT, OUTPUT)
    sim = SimConfig(record=False, heartbeat_s=heartbeat_s)
    run_large(f"g, heartbeat {heartbeat_s:g} s", insts, RowWork.tiled(rows, block), sim, echo)


@click.command()
@click.option("--quick", is_flag=True, help="Smaller jobs, and (f) at 96 instances, 1M rows.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--hours", type=float, default=2.0, show_default=True,
              help="Size of each job (a)-(e): hours of work for its cluster at full speed.")
@click.option("--skip-scale", is_flag=True, help="Leave out (f) and (g).")
@click.option("--only-scale", is_flag=True, help="Only (f) and (g).")
@click.option("--heartbeat", type=float, default=10.0, show_default=True,
              help="Heartbeat interval of the instances in (g).")
def main(
    quick: bool, seed: int, hours: float, skip_scale: bool, only_scale: bool, heartbeat: float
) -> None:
    hours = 0.25 if quick else hours
    if not only_scale:
        table(seed, hours, click.echo)
        routed(seed, hours, click.echo)
    if not skip_scale:
        scale(seed, quick, hours, click.echo)
        huge(seed, quick, heartbeat, click.echo)


if __name__ == "__main__":
    main()
