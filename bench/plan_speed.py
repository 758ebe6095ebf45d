"""Time planning a 10-pool heterogeneous cluster (8 devices per node each); target < 1 s.

Also times the job's makespan forecast (the plan run through the simulator), which `hetbatch
plan` adds when the row count is known; it has no target beyond "a few seconds".

Run: .venv/bin/python bench/plan_speed.py [--model NAME] [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planning import JobPlanInputs, forecast_makespan

TYPES = ("H200", "H100 SXM", "H100 PCIe", "A100 80GB", "A100 40GB", "L40S", "L4", "A10G",
         "MI300X", "Gaudi 2")
TARGET_S = 1.0


def cluster() -> list[PoolRequest]:
    return [
        PoolRequest(f"pool{i}-{t.replace(' ', '')}", t, 8, nodes=1 + i % 3,
                    price_per_device_hour=0.5 + i * 0.3)
        for i, t in enumerate(TYPES)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="meta-llama/Llama-3.1-70B-Instruct")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = load_model_profile(args.model)
    workload = Workload(input_len_mean=700, input_len_p95=1800, output_len_mean=300,
                        rows=10_000_000)
    pools = cluster()
    times: dict[str, list[float]] = {}
    for objective in ("throughput", "cost"):
        for _ in range(args.repeat):
            start = time.perf_counter()
            plan = plan_cluster(model, pools, workload, objective=objective)
            times.setdefault(objective, []).append(time.perf_counter() - start)
        configs = sum(len(p.rejected) for p in plan.pools)
        print(f"{objective:10} median {statistics.median(times[objective]) * 1000:7.1f} ms "
              f"(10 pools, {len(plan.pools)} planned, {configs} rejected configs kept)")
    worst = max(max(v) for v in times.values())
    verdict = "ok" if worst < TARGET_S else "SLOW"
    print(f"worst {worst * 1000:.1f} ms vs target {TARGET_S * 1000:.0f} ms: {verdict}")
    for rows in (10_000, workload.rows):
        job = dataclasses.replace(workload, rows=rows)
        inputs = JobPlanInputs(model, pools, job)
        plan = plan_cluster(model, pools, job, top_k=0)
        span = forecast_makespan(inputs, plan)
        assert span is not None
        print(f"makespan of {rows:,} rows on {sum(p.instances for p in plan.pools)} instances: "
              f"{span.makespan_s:,.0f} s ({span.low_s:,.0f}-{span.high_s:,.0f}), steady "
              f"{span.steady_s:,.0f} s; simulated {span.simulated_rows:,} rows x {span.draws} "
              f"draws in {span.compute_s:.2f} s")


if __name__ == "__main__":
    main()
