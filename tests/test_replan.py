"""Re-planning a pool mid-job: the pure decision, the simulator, the job file, real vLLM."""

from __future__ import annotations

import itertools
import json
import re
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hetbatch.planner import Calibration, PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import DEFAULT_CATALOG
from hetbatch.planner.model import DEFAULT_COEFFICIENTS, Coefficients
from hetbatch.planner.replan import (
    InstanceFigures,
    PlanContext,
    PoolMeasurement,
    Replanner,
    ReplanPolicy,
    decide_replan,
    pool_measurement,
)
from hetbatch.planner.search import candidates_for_pool
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import make_scheduler
from hetbatch.sim import LengthDist, RowWork, SimConfig, SimInstance, simulate
from hetbatch.sim.simulation import SimReplan
from tests.jobutil import (
    assert_exactly_once,
    ledger,
    make_input,
    run_cli,
    sim_job,
    sim_pool,
    start_cli,
    wait_for,
    write_job,
)
from tests.replan_vllm import STALE_CPU, write_replan_job

# L40S coefficients from somewhere else: twice its bandwidth and no cost per engine step. The
# plan they make runs max_num_seqs 128 at about half the speed it promises.
WRONG_L40S = replace(DEFAULT_COEFFICIENTS, bandwidth_eff=2.0, step_overhead_s=1e-6)
WORKLOAD = Workload(200, 400, 400, input_len_max=800, output_len_max=800)


def _l40s(**pins) -> tuple[PlanContext, object, dict]:
    model = load_model_profile("llama-3.1-8b")
    req = PoolRequest("l40s", "L40S", 4, tensor_parallel_size=1, **pins)
    plan = plan_cluster(model, [req], WORKLOAD, calibration=Calibration({"L40S": WRONG_L40S}),
                        top_k=0).pools[0]
    acc = DEFAULT_CATALOG.get("L40S")
    truth = {c.config: c.per_instance for c in
             candidates_for_pool(model, req, acc, DEFAULT_COEFFICIENTS, WORKLOAD)}
    ctx = PlanContext(model, {"l40s": req}, WORKLOAD, coefficients={"l40s": WRONG_L40S})
    return ctx, plan, truth


def _seen(rate: float, concurrency: float) -> PoolMeasurement:
    return PoolMeasurement("l40s", 4, rate, 200, 400, concurrency)


def test_a_pool_at_half_its_plan_moves_to_a_layout_that_is_really_faster() -> None:
    ctx, plan, truth = _l40s()
    true_now = truth[plan.config]
    assert 0.4 < true_now.output_tokens_per_s / plan.capacity_weight < 0.6
    decision = decide_replan(ctx, plan, _seen(true_now.output_tokens_per_s,
                                              true_now.concurrency), ReplanPolicy())
    assert decision is not None
    assert decision.new.max_num_seqs > plan.config.max_num_seqs
    assert decision.new.tensor_parallel_size == plan.config.tensor_parallel_size
    assert decision.engine_args["max_num_seqs"] == decision.new.max_num_seqs
    # The re-fitted coefficients reproduce what was measured, and the new layout really wins.
    assert decision.refit_old == pytest.approx(true_now.output_tokens_per_s, rel=0.1)
    assert truth[decision.new].output_tokens_per_s > 1.3 * true_now.output_tokens_per_s
    assert "max_num_seqs 128 -> " in decision.describe()


def test_no_replan_near_the_plan_or_when_the_batch_is_pinned() -> None:
    ctx, plan, truth = _l40s()
    near = _seen(plan.capacity_weight * 0.9, plan.concurrency)
    assert decide_replan(ctx, plan, near, ReplanPolicy()) is None
    # A strict threshold re-fits from the one figure; whatever it then restarts into is no
    # slower under the true coefficients.
    strict = decide_replan(ctx, plan, near, ReplanPolicy(threshold=0.05))
    assert strict is None or (truth[strict.new].output_tokens_per_s
                              >= truth[strict.old].output_tokens_per_s)
    pinned_ctx, pinned_plan, pinned_truth = _l40s(max_num_seqs=128)
    slow = pinned_truth[pinned_plan.config]
    seen = _seen(slow.output_tokens_per_s, slow.concurrency)
    assert decide_replan(pinned_ctx, pinned_plan, seen, ReplanPolicy()) is None


def test_figures_count_only_instances_that_did_enough() -> None:
    policy = ReplanPolicy(min_units=3, min_active_s=10)
    figures = [
        InstanceFigures("p", 5, 20.0, 40_000, 100, 20_000, concurrency=50),
        InstanceFigures("p", 2, 20.0, 1, 100, 1),  # too few units
        InstanceFigures("p", 5, 5.0, 1, 100, 1),  # too short
        InstanceFigures("q", 5, 20.0, 1, 100, 1),  # another pool
    ]
    seen = pool_measurement("p", figures, policy)
    assert seen == PoolMeasurement("p", 1, 2_000.0, 200.0, 400.0, 50.0)
    assert pool_measurement("p", figures[1:3], policy) is None


def _sim(replan_on: bool, rows: int = 120_000):
    ctx, plan, truth = _l40s()
    fast = SimInstance("h100-0", 8_000, 8_000, 256, pool="h100")
    speed = truth[plan.config]
    insts = [fast] + [
        SimInstance(f"l40s-{k}", plan.capacity_weight, speed.output_tokens_per_s,
                    speed.concurrency, pool="l40s") for k in range(4)
    ]
    work = RowWork.sample(rows, np.random.default_rng(3), LengthDist(200, 0.5),
                          LengthDist(360, 0.5, maximum=800), 0.0)
    hook = SimReplan(
        Replanner(ctx, {"l40s": plan}, ReplanPolicy(min_units=2, min_active_s=60)),
        lambda pool, cfg: (truth[cfg].output_tokens_per_s, truth[cfg].concurrency),
        check_s=30, restart_s=60, input_len=200,
    ) if replan_on else None
    sched = make_scheduler("hetbatch", rows, SchedulerConfig(max_unit_rows=1024))
    return simulate(sched, insts, work, SimConfig(), replan=hook), hook, truth


def test_simulator_restarts_a_slow_pool_in_its_new_layout_each_row_once() -> None:
    off, _, _ = _sim(False)
    on, hook, _truth = _sim(True)
    assert hook is not None and len(hook.events) == 1
    at, decision = hook.events[0]
    assert decision.pool == "l40s" and at < 0.3 * on.makespan
    assert on.completed
    spans = sorted((a.row0, a.row1) for a in on.assignments)
    assert spans[0][0] == 0 and spans[-1][1] == on.total_rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    # After the restart the pool's units ran at the new configuration's speed.
    late = [a for a in on.assignments if a.instance.startswith("l40s") and a.start > at + 60]
    assert late
    assert on.makespan < 0.97 * off.makespan


def test_replan_needs_a_planned_vllm_pool(tmp_path: Path) -> None:
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 100), [sim_pool("a", 1000)],
                  replan={"enabled": True})
    proc = run_cli("run", str(write_job(tmp_path / "job.yaml", job)), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hetbatch: {tmp_path / 'job.yaml'}: replan.enabled needs engine kind vllm (the "
        "simulated engine has no plan)"
    ]
    assert not (tmp_path / "out").exists()
    job["replan"] = {"enabled": True, "threshold": 0}
    proc = run_cli("run", str(write_job(tmp_path / "job.yaml", job)), timeout=60)
    assert proc.returncode == 2
    assert "replan.threshold: Input should be greater than 0" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_stale_calibration_plans_8_seqs_and_a_slow_live_figure_moves_it(
    tiny_model: Path,
) -> None:
    """The premise of the vLLM tests, on the planner alone."""
    coef = Coefficients(**{k: v for k, v in STALE_CPU.items() if k != "measurements"})
    model = load_model_profile(str(tiny_model), "fp32")
    req = PoolRequest("cpu", "cpu", 2, max_num_batched_tokens=512)
    workload = Workload(60, 90, 24, input_len_max=300, output_len_max=24)
    plan = plan_cluster(model, [req], workload, calibration=Calibration({"cpu": coef}),
                        top_k=0).pools[0]
    assert plan.config.max_num_seqs == 8
    ctx = PlanContext(model, {"cpu": req}, workload, coefficients={"cpu": coef})
    seen = PoolMeasurement("cpu", 2, 600.0, 60, 24, 8)
    decision = decide_replan(ctx, plan, seen, ReplanPolicy())
    assert decision is not None and decision.new.max_num_seqs > 64
    assert decision.new.max_num_batched_tokens == 512  # pinned by the job


def _run_replanned(tmp_path: Path, tiny_model: Path, rows: int, *flags: str):
    job = write_replan_job(tmp_path, rows, tiny_model)
    calibration = str(tmp_path / "stale.calibration.json")
    return job, ["run", str(job), "--no-progress", "--calibration", calibration, *flags]


@pytest.mark.vllm
def test_vllm_pool_planned_at_8_seqs_is_restarted_with_more_each_row_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    rows = 2_000
    _, args = _run_replanned(tmp_path, tiny_model, rows)
    proc = run_cli(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-plan: pool cpu: measured " in proc.stderr
    assert "max_num_seqs 8 -> " in proc.stderr
    assert proc.stderr.count("finished its units; restarting in the re-planned layout") == 2
    out = tmp_path / "out"
    df = assert_exactly_once(out, rows)
    assert set(df["instance"]) == {"cpu-0-0", "cpu-0-1"}
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    (replan,) = metrics["replans"]
    assert replan["engine_args"]["max_num_seqs"] > 8
    # Units leased after the re-plan ran on the restarted engines, which ran more than the
    # old 8 sequences at once (as vLLM's scheduler reported them). Their speed is measured by
    # bench/replan.py, not here.
    at = metrics["started_at"] + replan["at_s"]
    assert [r for r in ledger(out) if r["at"] <= at]
    assert [r for r in ledger(out) if r["leased_at"] > at]
    seqs = replan["engine_args"]["max_num_seqs"]
    for name in ("cpu-0-0", "cpu-0-1"):
        log = (out / "_hetbatch" / "logs" / f"{name}.log").read_text()
        assert log.count(f"started {name} on devices") == 2
        assert "re-planned: finishing " in log
        ready = re.findall(r"engine ready in [0-9.]+ s: up to (\d+) sequences", log)
        assert [int(n) for n in ready] == [8, seqs]
        assert metrics["instances"][name]["peak_running"] > 8


@pytest.mark.vllm
def test_vllm_replanned_run_interrupted_resumes_each_row_once(
    tmp_path: Path, tiny_model: Path
) -> None:
    rows = 4_000  # with 2,000 the restarted engines could finish every row before the interrupt
    _job, args = _run_replanned(tmp_path, tiny_model, rows)
    out = tmp_path / "out"
    proc = start_cli(*args)

    def replanned_and_working() -> bool:
        logs = out / "_hetbatch" / "logs"
        restarted = [p for p in logs.glob("*.log") if p.read_text().count("started ") >= 2]
        return len(restarted) == 2 and len(ledger(out)) >= 8

    try:
        wait_for(replanned_and_working, 300, "both workers restarted after the re-plan")
        done = len(ledger(out))
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert len(ledger(out)) >= done
    assert not (out / "_SUCCESS").exists()
    rerun = run_cli(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming with" in rerun.stdout
    assert_exactly_once(out, rows)
