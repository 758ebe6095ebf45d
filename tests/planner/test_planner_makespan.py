"""The job's makespan: the plan run through the simulator, beside the steady-state figure."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from hetbatch.cli.plan import plan_command
from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planning import JobPlanInputs, capped_lognormal, forecast_makespan, lognormal_sigma


def _forecast(rows: int, sigma: float = 1.0, pools=None):
    model = load_model_profile("llama-3.1-8b")
    pools = pools or [PoolRequest("h100", "H100", 1)]
    workload = Workload(220, 700, 200, rows=rows, output_len_max=1500)
    inputs = JobPlanInputs(model, pools, workload)
    return forecast_makespan(inputs, plan_cluster(model, pools, workload), output_sigma=sigma)


def test_short_skewed_job_takes_longer_than_its_steady_rate() -> None:
    m = _forecast(1000)
    assert m is not None and m.simulated_rows == 1000
    assert m.low_s <= m.makespan_s <= m.high_s
    assert m.makespan_s > 1.3 * m.steady_s  # the drain of the longest outputs


def test_long_job_converges_to_its_steady_rate() -> None:
    m = _forecast(2_000_000)
    assert m is not None and m.simulated_rows < m.rows
    assert abs(m.makespan_s / m.steady_s - 1) < 0.05


def test_alike_lengths_drain_sooner_than_skewed_ones() -> None:
    alike, skewed = _forecast(1000, sigma=0.0), _forecast(1000, sigma=1.2)
    assert alike is not None and skewed is not None
    assert alike.makespan_s < skewed.makespan_s


def test_no_rows_no_makespan() -> None:
    model = load_model_profile("llama-3.1-8b")
    pools = [PoolRequest("h100", "H100", 1)]
    workload = Workload(220, 700, 200)
    assert forecast_makespan(JobPlanInputs(model, pools, workload),
                             plan_cluster(model, pools, workload)) is None


def test_capped_lengths_keep_the_mean() -> None:
    rng = np.random.default_rng(1)
    for mean, sigma, cap in ((200, 1.0, 1500), (256, 0.5, 512), (100, 0.5, 100)):
        drawn = capped_lognormal(mean, sigma, cap).sample(rng, 100_000)
        assert drawn.max() <= cap
        assert abs(drawn.mean() / mean - 1) < 0.02
    assert lognormal_sigma(500, 500) == 0.0
    assert 0.4 < lognormal_sigma(500, 1000) < 0.6


def test_cli_prints_both_figures() -> None:
    args = ["--model", "llama-3.1-8b", "--accelerator", "H100", "--devices", "2",
            "--input-len", "300", "--output-len", "200", "--rows", "5000"]
    text = CliRunner().invoke(plan_command, args)
    assert text.exit_code == 0, text.output
    assert "Makespan of 5,000 rows (simulated)" in text.output
    assert "steady-state rate alone" in text.output
    data = json.loads(CliRunner().invoke(plan_command, [*args, "--json"]).output)
    assert data["makespan"]["rows"] == 5000
    assert data["makespan"]["makespan_s"] >= data["makespan"]["steady_s"] * 0.95
