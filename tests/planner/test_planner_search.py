"""Search and objectives: determinism, cost, deadline, shares and capacity weights."""

from __future__ import annotations

import itertools
import json

import pytest

from hetbatch.errors import UserError
from hetbatch.planner import PoolPlan, PoolRequest, Workload, load_model_profile, plan_cluster

MIXED = [
    PoolRequest("h100", "H100", 8, nodes=2, price_per_device_hour=2.5),
    PoolRequest("a100", "A100", 8, nodes=2, price_per_device_hour=1.3),
    PoolRequest("l40s", "L40S", 4, nodes=3, price_per_device_hour=0.9),
]


def test_same_inputs_same_plan(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    first = plan_cluster(model, MIXED, chat_workload)
    second = plan_cluster(model, list(MIXED), chat_workload)
    assert json.dumps(first.to_dict(), sort_keys=True) == json.dumps(second.to_dict(),
                                                                       sort_keys=True)
    reordered = plan_cluster(model, list(reversed(MIXED)), chat_workload)
    by_pool = {p.pool: p.config for p in reordered.pools}
    assert all(by_pool[p.pool] == p.config for p in first.pools)


def test_shares_and_weights_add_up(chat_workload: Workload) -> None:
    plan = plan_cluster(load_model_profile("llama-3.1-8b"), MIXED, chat_workload)
    assert sum(p.share for p in plan.pools) == pytest.approx(1.0)
    for p in plan.pools:
        assert p.capacity_weight * p.instances == pytest.approx(p.output_tokens_per_s)
        assert p.total_tokens_per_s == pytest.approx(p.output_tokens_per_s * 768 / 256)
        assert p.est_time_s == pytest.approx(plan.est_time_s)
        assert set(p.engine_args) >= {
            "tensor_parallel_size", "pipeline_parallel_size", "max_num_seqs",
            "max_num_batched_tokens", "gpu_memory_utilization", "max_model_len",
        }
    h100 = next(p for p in plan.pools if p.pool == "h100")
    l40s = next(p for p in plan.pools if p.pool == "l40s")
    assert h100.capacity_weight > l40s.capacity_weight
    rows_per_s = plan.output_tokens_per_s / 256
    assert plan.est_time_s == pytest.approx(1_000_000 / rows_per_s)


def test_runners_up_and_rejections_are_explained(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-70b")
    plan = plan_cluster(model, [MIXED[0]], chat_workload, top_k=4)
    pool = plan.pools[0]
    assert 1 <= len(pool.runners_up) <= 4
    assert all(r.why for r in pool.runners_up)
    # One per other parallel layout first (the best of each, in score order), then the rest.
    chosen = (pool.config.tensor_parallel_size, pool.config.pipeline_parallel_size)
    layouts = [(r.config.tensor_parallel_size, r.config.pipeline_parallel_size)
               for r in pool.runners_up]
    first = 0
    while first < len(layouts) and layouts[first] not in [*layouts[:first], chosen]:
        first += 1
    assert first >= 1
    for part in (pool.runners_up[:first], pool.runners_up[first:]):
        assert all(b.score <= a.score * 1.02 for a, b in itertools.pairwise(part))
    assert any(r.config.tensor_parallel_size == 1 and "exceed" in r.reason
               for r in pool.rejected)
    assert plan_cluster(model, [MIXED[0]], chat_workload, top_k=0).pools[0].runners_up == ()


def test_cost_objective_needs_prices(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    with pytest.raises(UserError, match="price"):
        plan_cluster(model, [PoolRequest("h", "H100", 8)], chat_workload, objective="cost")
    with pytest.raises(UserError, match="unknown objective"):
        plan_cluster(model, MIXED, chat_workload, objective="speed")


def test_cost_objective_maximises_tokens_per_dollar(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-70b")
    pool = [PoolRequest("h", "H100", 8, price_per_device_hour=2.5)]
    fast = plan_cluster(model, pool, chat_workload, objective="throughput").pools[0]
    cheap = plan_cluster(model, pool, chat_workload, objective="cost").pools[0]

    def per_dollar(p: PoolPlan) -> float:
        return p.output_tokens_per_s / p.cost_per_hour

    assert per_dollar(cheap) >= per_dollar(fast) * 0.999
    assert cheap.cost_per_hour == pytest.approx(2.5 * cheap.instances
                                                * cheap.config.devices_per_instance)


def test_deadline_picks_the_cheapest_nodes_that_finish(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    full = plan_cluster(model, MIXED, chat_workload)
    assert full.est_time_s is not None
    loose = plan_cluster(model, MIXED, chat_workload, objective="deadline",
                         deadline_s=full.est_time_s * 4)
    assert loose.est_time_s <= full.est_time_s * 4
    assert sum(p.nodes_used for p in loose.pools) < sum(p.nodes for p in MIXED)
    tight = plan_cluster(model, MIXED, chat_workload, objective="deadline",
                         deadline_s=full.est_time_s * 1.05)
    assert tight.est_time_s <= full.est_time_s * 1.05
    assert loose.est_cost <= tight.est_cost
    with pytest.raises(UserError, match="relax the deadline"):
        plan_cluster(model, MIXED, chat_workload, objective="deadline",
                     deadline_s=full.est_time_s * 0.5)
    with pytest.raises(UserError, match="row count"):
        plan_cluster(model, MIXED, Workload(512, 1024, 256), objective="deadline",
                     deadline_s=100)


def test_calibration_replaces_defaults_for_its_accelerator(chat_workload: Workload) -> None:
    from hetbatch.planner import Calibration, Coefficients

    model = load_model_profile("llama-3.1-8b")
    slow = Calibration({"H100 SXM": Coefficients(compute_eff=0.2, bandwidth_eff=0.3)})
    base = plan_cluster(model, MIXED, chat_workload)
    calibrated = plan_cluster(model, MIXED, chat_workload, calibration=slow)
    rate = {p.pool: p.output_tokens_per_s for p in base.pools}
    new = {p.pool: p.output_tokens_per_s for p in calibrated.pools}
    assert new["h100"] < rate["h100"] * 0.7
    assert new["a100"] == pytest.approx(rate["a100"])


def test_workload_from_samples() -> None:
    w = Workload.from_samples(list(range(1, 101)), output_len_mean=50, rows=10)
    assert w.input_len_mean == pytest.approx(50.5)
    assert w.input_len_p95 == 95
    assert w.input_max == 100 and w.output_max == 100
    with pytest.raises(UserError):
        Workload.from_samples([], output_len_mean=5)
