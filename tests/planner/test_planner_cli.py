"""The `plan` command's what-if form, as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from hetbatch.cli.plan import plan_command

WHAT_IF = ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--accelerator", "H100",
           "--devices", "8", "--input-len", "512", "--output-len", "256"]


def test_table() -> None:
    result = CliRunner().invoke(plan_command, [*WHAT_IF, "--rows", "1000000"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Plan for llama-3.1-8b (bf16), objective throughput" in out
    assert "H100 SXM" in out and "out tok/s" in out and "share" in out
    assert "runner-up" in out and "rows done in" in out


def test_json() -> None:
    result = CliRunner().invoke(plan_command, [*WHAT_IF, "--nodes", "2", "--json", "--top", "2"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    pool = plan["pools"][0]
    for key in ("accelerator", "tensor_parallel_size", "pipeline_parallel_size", "instances",
                "max_num_seqs", "output_tokens_per_s", "total_tokens_per_s", "engine_args",
                "capacity_weight", "share", "runners_up", "rejected"):
        assert key in pool
    assert pool["accelerator"] == "H100 SXM"
    assert pool["instances"] * pool["tensor_parallel_size"] == 16
    assert len(pool["runners_up"]) <= 2
    assert pool["output_tokens_per_s"] > 1000


def test_heterogeneous_what_if_and_options(tmp_path: Path) -> None:
    args = ["--model", "llama-3.1-70b", "--quantization", "fp8", "--pool", "H100:8:1:2.5",
            "--pool", "L40S:4:2:0.9", "--input-len", "1000", "--input-len-p95", "2000",
            "--output-len", "300", "--rows", "200000", "--objective", "cost", "--json"]
    result = CliRunner().invoke(plan_command, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["objective"] == "cost" and plan["quantization"] == "fp8"
    assert {p["accelerator"] for p in plan["pools"]} == {"H100 SXM", "L40S"}
    assert plan["est_cost"] > 0


def test_user_errors_exit_2_with_one_line() -> None:
    runner = CliRunner()
    bad_acc = runner.invoke(plan_command, [*WHAT_IF[:3], "tpu-v9", *WHAT_IF[4:]])
    assert bad_acc.exit_code == 2
    assert "unknown accelerator" in bad_acc.output and bad_acc.output.count("\n") == 1
    missing = runner.invoke(plan_command, ["--accelerator", "H100", "--devices", "8"])
    assert missing.exit_code == 2 and "--model" in missing.output
    too_big = runner.invoke(plan_command, ["--model", "llama-3.1-405b", "--accelerator", "L4",
                                           "--devices", "4", "--input-len", "512",
                                           "--output-len", "128"])
    assert too_big.exit_code == 2 and "fits in no pool" in too_big.output
    bad_pool = runner.invoke(plan_command, [*WHAT_IF, "--pool", "H100"])
    assert bad_pool.exit_code == 2 and "ACC:DEVICES" in bad_pool.output


def test_invalid_job_file_is_a_one_line_error(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: {path: x}\n")
    result = CliRunner().invoke(plan_command, [str(job)])
    assert result.exit_code == 2
    assert "required field is missing" in result.output and result.output.count("\n") == 1


def test_help() -> None:
    result = CliRunner().invoke(plan_command, ["--help"])
    assert result.exit_code == 0
    assert "--accelerator" in result.output and "JOB" in result.output


def test_calibration_sets_the_plan_and_its_makespan(tmp_path: Path) -> None:
    from tests.sim.test_cli import _calibration, _vllm_job

    job_file = _vllm_job(tmp_path)

    def plan(compute_eff: float) -> dict:
        cal = _calibration(tmp_path / f"cal-{compute_eff}.json", compute_eff)
        result = CliRunner().invoke(plan_command, [job_file, "--calibration", cal, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    fast, slow = plan(0.05), plan(0.005)
    assert slow["output_tokens_per_s"] < fast["output_tokens_per_s"]
    assert slow["makespan"]["makespan_s"] > fast["makespan"]["makespan_s"]
