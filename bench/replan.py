"""Re-planning a pool mid-job: the same job with re-planning off and on, side by side.

`sim`: in the simulator, Llama-3.1-8B on 8 H100 (planned with the right coefficients) and 8
L40S whose plan came from coefficients that are wrong for them (twice their memory bandwidth,
no step overhead): the plan runs them at max_num_seqs 128, where their true speed is about half
what it promised. The simulated truth of every configuration is the throughput model under the
L40S's datasheet coefficients. With re-planning on, the live figure re-fits the L40S
coefficients, the search finds a configuration that wins, and the pool's instances drain their
units and restart in it (a minute of start-up each).

`vllm`: real vLLM on the CPU, the tiny model, two instances; the pool is planned with a stale
calibration file that makes the planner pick max_num_seqs 8, far from the best. Re-planning off
and on, each row once in both.

    python bench/replan.py sim [--hours 1]
    python bench/replan.py vllm [--rows 6000]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np

from hetbatch.planner import Calibration, PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import DEFAULT_CATALOG
from hetbatch.planner.model import DEFAULT_COEFFICIENTS, Coefficients
from hetbatch.planner.replan import PlanContext, Replanner, ReplanPolicy
from hetbatch.planner.search import candidates_for_pool
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import make_scheduler
from hetbatch.sim import LengthDist, RowWork, SimConfig, SimInstance, simulate
from hetbatch.sim.simulation import SimReplan

# What the L40S plan was made with: twice the bandwidth it has, no cost per engine step.
WRONG_L40S = replace(DEFAULT_COEFFICIENTS, bandwidth_eff=2.0, step_overhead_s=1e-6)
INPUT_LEN, OUTPUT_LEN = 200, 400


def sim_setup():
    model = load_model_profile("llama-3.1-8b")
    workload = Workload(INPUT_LEN, 2 * INPUT_LEN, OUTPUT_LEN, input_len_max=4 * INPUT_LEN,
                        output_len_max=2 * OUTPUT_LEN)
    pools = [PoolRequest("h100", "H100", 8, tensor_parallel_size=1),
             PoolRequest("l40s", "L40S", 4, nodes=2, tensor_parallel_size=1)]
    calibration = Calibration({"L40S": WRONG_L40S})
    plan = plan_cluster(model, pools, workload, calibration=calibration, top_k=0)
    truth = {p.name: _truth(model, p, DEFAULT_COEFFICIENTS, workload) for p in pools}
    ctx = PlanContext(model, {p.name: p for p in pools}, workload,
                      coefficients={"l40s": WRONG_L40S, "h100": DEFAULT_COEFFICIENTS})
    return model, workload, plan, truth, ctx


def _truth(model, req: PoolRequest, coef: Coefficients, workload: Workload) -> dict:
    """Every configuration's speed under `coef`: (output tokens/s, sequences at once)."""
    acc = DEFAULT_CATALOG.get(req.accelerator)
    return {c.config: (c.per_instance.output_tokens_per_s, c.per_instance.concurrency)
            for c in candidates_for_pool(model, req, acc, coef, workload)}


def run_sim(hours: float, replan_on: bool, seed: int = 0):
    _, _, plan, truth, ctx = sim_setup()
    insts = []
    for p in plan.pools:
        speed, seqs = truth[p.pool][p.config]
        insts += [SimInstance(f"{p.pool}-{k}", p.capacity_weight, speed, seqs, pool=p.pool)
                  for k in range(p.instances)]
    capacity = sum(i.speed for i in insts)
    rows = int(hours * 3600 * capacity / OUTPUT_LEN)
    rng = np.random.default_rng(seed)
    work = RowWork.sample(rows, rng, LengthDist(INPUT_LEN, 0.5),
                          LengthDist(OUTPUT_LEN * 0.9, 0.5, maximum=2 * OUTPUT_LEN), 0.0)
    hook = None
    if replan_on:
        replanner = Replanner(ctx, {p.pool: p for p in plan.pools},
                              ReplanPolicy(min_units=2, min_active_s=60.0))
        hook = SimReplan(replanner, lambda pool, cfg: truth[pool][cfg], check_s=30.0,
                         restart_s=60.0, input_len=INPUT_LEN)
    sched = make_scheduler("hetbatch", rows, SchedulerConfig(max_unit_rows=1024))
    result = simulate(sched, insts, work, SimConfig(record=True), replan=hook)
    return result, hook, plan, truth, work


def pool_rate(result, work: RowWork, pool: str, t0: float, t1: float) -> float:
    """Output tokens/s of the pool's units committed within [t0, t1]."""
    done = [a for a in result.assignments if a.instance.startswith(pool) and t0 <= a.end <= t1]
    return sum(work.cost(a.row0, a.row1) for a in done) / max(t1 - t0, 1e-9)


@click.group()
def main() -> None:
    """Re-planning benchmarks."""


@main.command("sim")
@click.option("--hours", type=float, default=1.0, show_default=True)
def sim_command(hours: float) -> None:
    """Simulated: a pool whose true speed is half its plan, re-planning off and on."""
    off, _, plan, truth, work = run_sim(hours, False)
    on, hook, _, _, _ = run_sim(hours, True)
    l40s = next(p for p in plan.pools if p.pool == "l40s")
    true_speed = truth["l40s"][l40s.config][0]
    print(f"plan for l40s: {l40s.config.label()}, {l40s.capacity_weight:,.0f} output tok/s "
          f"per instance; true speed {true_speed:,.0f} ({true_speed / l40s.capacity_weight:.2f}"
          " of the plan)")
    assert hook is not None
    for t, decision in hook.events:
        print(f"at {t:,.0f} s: {decision.describe()}")
        new_speed = truth["l40s"][decision.new][0]
        print(f"  true speed of the new configuration {new_speed:,.0f} output tok/s per "
              f"instance ({new_speed / true_speed:.2f}x the old one)")
    t_re = hook.events[0][0] if hook.events else 0.0
    back = t_re + 60.0 + 120.0
    print(f"{'':28s}{'off':>12s}{'on':>12s}{'on/off':>9s}")
    print(f"{'makespan s':28s}{off.makespan:12,.0f}{on.makespan:12,.0f}"
          f"{off.makespan / on.makespan:9.3f}x faster")
    for label, a, b in (("l40s tok/s before", 0.0, t_re),
                        ("l40s tok/s after restart", back, on.makespan * 0.9)):
        r_off = pool_rate(off, work, "l40s", a, b)
        r_on = pool_rate(on, work, "l40s", a, b)
        print(f"{label:28s}{r_off:12,.0f}{r_on:12,.0f}{r_on / max(r_off, 1e-9):9.2f}x")
    rows_ok = on.completed and sum(s.rows for s in on.instances.values()) == on.total_rows
    print(f"every row committed once with re-planning on: {rows_ok}")


@main.command("vllm")
@click.option("--rows", type=int, default=6000, show_default=True)
@click.option("--model", default="data/tiny-model", show_default=True,
              help="The tiny model (data/build_tiny_model.py builds it).")
@click.option("--keep", type=click.Path(file_okay=False), help="Keep the runs' outputs here.")
def vllm_command(rows: int, model: str, keep: str | None) -> None:
    """Real vLLM on the CPU: a pool planned at max_num_seqs 8, re-planning off and on."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hetbatch-replan-"))
    root.mkdir(parents=True, exist_ok=True)
    from tests.replan_vllm import rate_per_instance as _rate
    from tests.replan_vllm import write_replan_job

    results = {}
    for mode in ("off", "on"):
        job = write_replan_job(root / mode, rows, model, replan=mode == "on")
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "hetbatch", "run", str(job), "--no-progress",
                               "--calibration", str(root / mode / "stale.calibration.json")],
                              capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            sys.exit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        results[mode] = (wall, root / mode / "out", proc.stderr)
    for mode, (wall, out, stderr) in results.items():
        metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
        records = [json.loads(x) for x in (out / "_hetbatch" / "ledger.jsonl").read_text().split()]
        done = sum(r["end"] - r["start"] for r in records)
        print(f"re-planning {mode}: {done:,} of {rows:,} rows, {_rate(records):,.0f} output tok/s "
              f"per instance over the run, {_window_rate(records):,.0f} in all "
              f"(wall {wall:.1f} s incl. start-up)")
        for replan in metrics.get("replans", []):
            at = metrics["started_at"] + replan["at_s"]
            before = [r for r in records if r["at"] <= at]
            after = [r for r in records if r["leased_at"] > at]
            print(f"  re-plan at {replan['at_s']:.1f} s: {replan['old']} -> {replan['new']}")
            print(f"  per instance: {_rate(before):,.0f} output tok/s before, "
                  f"{_rate(after):,.0f} after ({_rate(after) / max(_rate(before), 1e-9):.2f}x); "
                  f"predicted before {replan['predicted']:,.0f}, re-fit expects "
                  f"{replan['expected']:,.0f}")
        if mode == "on":
            print(f"  warnings: {sum('re-plan' in x for x in stderr.splitlines())} re-plan line(s)")



def _window_rate(records: list[dict]) -> float:
    """Output tokens/s of the whole job over its processing window (first lease, last commit)."""
    span = max(r["at"] for r in records) - min(r["leased_at"] for r in records)
    return sum(r["completion_tokens"] for r in records) / max(span, 1e-6)


if __name__ == "__main__":
    main()
