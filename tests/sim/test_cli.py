"""`hetbatch simulate` through click, on a job file with simulated engines."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from hetbatch.cli.simulate import simulate_command

JOB = """
model: {path: tiny}
input: {path: %s, prompt_column: prompt}
output: {path: %s}
engine: {kind: sim}
sampling: {max_tokens: 32}
scheduler: {min_unit_rows: 8, max_unit_rows: 256}
cluster:
  pools:
    - {name: fast, accelerator: cpu, devices_per_node: 2, sim: {tokens_per_s: 600, max_num_seqs: 8}}
    - {name: slow, accelerator: cpu, devices_per_node: 2, sim: {tokens_per_s: 200, max_num_seqs: 8}}
"""


def _cli() -> click.Group:
    group = click.Group()
    group.add_command(simulate_command)
    return group


def test_simulate_prints_json_with_faults_and_a_gantt(tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB % (tmp_path / "missing.parquet", tmp_path / "out"))
    png = tmp_path / "g.png"
    args = ["simulate", str(job), "--rows", "2000", "--json", "--lose", "fast-0-1@5",
            "--join", "slow-0-1@3", "--slow", "slow-0-0=0.5", "--gantt", str(png)]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["completed"] and sum(v["rows"] for v in data["instances"].values()) == 2000
    assert png.stat().st_size > 0
    text = CliRunner().invoke(_cli(), ["simulate", str(job), "--rows", "500"]).output
    assert "makespan" in text and "efficiency" in text


def test_simulate_bad_fault_is_a_one_line_user_error(tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB % (tmp_path / "missing.parquet", tmp_path / "out"))
    res = CliRunner().invoke(_cli(), ["simulate", str(job), "--lose", "nobody@3"])
    assert res.exit_code == 2 and "no instance 'nobody'" in res.output


def _vllm_job(tmp_path) -> str:
    """A vLLM job on a 2-core cpu pool with a tiny local model config (no engine needed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    model = tmp_path / "tiny"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 2048,
        "torch_dtype": "float32"}))
    prompts = [f"Tell me about the number {i}." for i in range(400)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    job = {
        "model": {"path": str(model), "engine_args": {"dtype": "float32", "max_num_seqs": 16}},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 16},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2,
                               "tensor_parallel_size": 1}]},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return str(tmp_path / "job.yaml")


def _calibration(path, compute_eff: float) -> str:
    coef = {"allreduce_latency_s": 2.5e-05, "bandwidth_eff": 0.9, "comm_eff": 0.3,
            "compute_eff": compute_eff, "internode_gbps": 25.0, "measurements": 8,
            "pp_loss_per_stage": 0.08, "reserve_gib": 0.5, "step_overhead_s": 1e-3,
            "token_overhead_s": 7e-05}
    path.write_text(json.dumps({"accelerators": {"cpu": coef}, "version": 1}))
    return str(path)


def test_calibration_sets_speeds_from_the_jobs_plan(tmp_path) -> None:
    from hetbatch.cli.simulate import build_instances
    from hetbatch.planning import load_calibration, plan_job
    from hetbatch.spec import load_job

    job_file = _vllm_job(tmp_path)
    fast = _calibration(tmp_path / "fast.json", 0.05)
    slow = _calibration(tmp_path / "slow.json", 0.005)
    job = load_job(job_file)
    plan = plan_job(job, calibration=load_calibration(fast), top_k=0).pools[0]
    insts = build_instances(job, calibration=fast)
    assert [i.speed for i in insts] == [plan.capacity_weight] * 2
    assert insts[0].max_num_seqs == plan.config.max_num_seqs

    def makespan(cal: str) -> float:
        args = ["simulate", job_file, "--calibration", cal, "--output-len", "16",
                "--output-sigma", "0", "--json"]
        res = CliRunner().invoke(_cli(), args)
        assert res.exit_code == 0, res.output
        data = json.loads(res.output)
        assert data["rows"] == 400
        # every row generates exactly 16 tokens and prompts cost nothing on top: the plan's
        # output tokens/s already prices prefill in
        assert data["tokens_per_s"] * data["makespan_s"] == pytest.approx(400 * 16, rel=1e-2)
        return data["makespan_s"]

    assert makespan(slow) > makespan(fast)


def test_sim_engine_speed_bills_whole_step_quanta() -> None:
    from hetbatch.cli.simulate import _sim_engine_speed

    # 40,000 tok/s over 64 requests: 12 tokens a ~20 ms step, so 8-token requests get 8/12
    assert _sim_engine_speed(40_000, 64, 8) == pytest.approx(40_000 * 8 / 12)
    assert _sim_engine_speed(10_000, 64, 8) == pytest.approx(10_000 * 8 / 9)
    assert _sim_engine_speed(600, 8, 32) == pytest.approx(600)
