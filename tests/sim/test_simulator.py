"""Every policy completes every row exactly once, in every scenario, deterministically."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from hetbatch.engines.base import EngineRequest
from hetbatch.engines.simulated import SimEngine, delivered_speed, step_seconds
from hetbatch.scheduler.policies import POLICIES, make_scheduler
from hetbatch.sim import RowWork, SimConfig, SimInstance, fluid_lower_bound, simulate
from tests.sim.helpers import CONFIG, cluster, rows_exactly_once, run, workload

SCENARIOS = {
    "plain": ({}, {}),
    "lost-leave": ({"lost_at": 40.0}, {}),
    "lost-timeout": ({"lost_at": 40.0}, {"loss": "timeout"}),
    "late-join": ({"late_at": 30.0}, {}),
    "lost-and-late": ({"lost_at": 40.0, "late_at": 30.0}, {"loss": "timeout"}),
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_row_once(policy: str, scenario: str) -> None:
    cluster_args, sim_args = SCENARIOS[scenario]
    result = run(policy, cluster(**cluster_args), workload(), **sim_args)
    assert result.completed
    assert rows_exactly_once(result)
    assert 0 < result.efficiency <= 1.0 + 1e-9


@pytest.mark.parametrize("policy", POLICIES)
def test_heavy_tail_and_slow_instance(policy: str) -> None:
    insts = cluster()
    insts[1] = SimInstance("fast-1", 300.0, 90.0, 16)  # planned fast, really slow
    result = run(policy, insts, workload(tail=0.01))
    assert result.completed and rows_exactly_once(result)


def test_deterministic_under_a_seed() -> None:
    a = run("hetbatch", cluster(lost_at=40.0), workload(seed=7))
    b = run("hetbatch", cluster(lost_at=40.0), workload(seed=7))
    c = run("hetbatch", cluster(lost_at=40.0), workload(seed=8))
    assert a.assignments == b.assignments and a.makespan == b.makespan
    assert a.assignments != c.assignments


def test_hetbatch_beats_round_robin_on_unequal_instances() -> None:
    work = workload(rows=6000)
    het, rr = run("hetbatch", cluster(), work), run("round-robin", cluster(), work)
    assert het.makespan < rr.makespan
    assert het.efficiency > 0.8


def test_fluid_lower_bound_respects_joins_and_losses() -> None:
    insts = [SimInstance("a", 1, 10.0, lost_at=5.0), SimInstance("b", 1, 10.0, join_at=10.0)]
    assert fluid_lower_bound(insts, 50.0) == pytest.approx(5.0)
    assert fluid_lower_bound(insts, 100.0) == pytest.approx(15.0)
    assert fluid_lower_bound([SimInstance("a", 1, 10.0, lost_at=1.0)], 100.0) == float("inf")


@pytest.mark.parametrize(("tokens_per_s", "seqs", "out_tokens"), [(40_000, 64, 8), (10_000, 64, 8),
                                                                   (600, 8, 32)])
def test_simulated_engine_delivers_the_speed_the_simulator_assumes(
    tokens_per_s: float, seqs: int, out_tokens: int
) -> None:
    """The fake engine, run on a clock that only counts its sleeps, delivers exactly the speed
    and the step length that the simulator gives its instances."""
    slept: list[float] = []
    engine = SimEngine(tokens_per_s, seqs, sleep=slept.append)
    for k in range(4 * seqs):
        engine.add(EngineRequest(str(k), "a prompt", {"max_tokens": out_tokens}))
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(c.completion_tokens for c in engine.step())
    assert tokens == 4 * seqs * out_tokens
    assert slept == pytest.approx([step_seconds(tokens_per_s, seqs)] * len(slept))
    assert tokens / sum(slept) == pytest.approx(delivered_speed(tokens_per_s, seqs, out_tokens))


def test_tiled_work_is_its_block_repeated() -> None:
    """A billion-row job repeats a sampled block; every unit's cost and drain is what the same
    lengths written out row by row give, across block boundaries too."""
    block = workload(rows=1000)
    repeated = RowWork(np.zeros(3000), np.tile(block.output_lens, 3), prefill_cost=0.0)
    tiled = RowWork.tiled(3000, RowWork(np.zeros(1000), block.output_lens, prefill_cost=0.0))
    assert tiled.rows == 3000 and tiled.total == pytest.approx(repeated.total)
    for start, end in [(0, 10), (990, 1010), (500, 2600), (1000, 2000), (2990, 3000)]:
        assert tiled.cost(start, end) == pytest.approx(repeated.cost(start, end))
        assert tiled.drain_s(start, end, 100.0, 0.01) == pytest.approx(
            repeated.drain_s(start, end, 100.0, 0.01)
        )


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_instances_told_to_wait_long_still_finish_every_row_once(scenario: str) -> None:
    """Waiting instances that together ask only twice a second, each up to 20 s apart, still
    finish every row exactly once (losses, late joins, steals), asking far less often."""
    cluster_args, sim_args = SCENARIOS[scenario]
    config = replace(CONFIG, waiting_asks_per_s=2.0, max_retry_s=20.0)
    patient = simulate(
        make_scheduler("hetbatch", 3000, config), cluster(**cluster_args), workload(),
        SimConfig(**sim_args),
    )
    eager = run("hetbatch", cluster(**cluster_args), workload(), **sim_args)
    assert patient.completed and rows_exactly_once(patient)
    assert patient.scheduler_calls < eager.scheduler_calls
