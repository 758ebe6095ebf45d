"""Planning from a job file: workload sampled from the input, pools and pins from the spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from hetbatch.cli.plan import plan_command
from hetbatch.errors import UserError
from hetbatch.planning import plan_job, token_counter, workload_from_job
from hetbatch.spec import parse_job

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _input(tmp_path: Path, rows: int = 300) -> Path:
    prompts = ["x" * (40 * (1 + i % 5)) for i in range(rows)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=64)
    return path


def _job(tmp_path: Path, model: Path | str, pools: list[dict[str, Any]], **extra: Any) -> dict:
    return {
        "model": {"path": str(model), "engine_args": {"max_num_seqs": 32}},
        "input": {"path": str(_input(tmp_path)), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 20},
        "cluster": {"pools": pools},
        **extra,
    }


def _write(tmp_path: Path, job: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return str(path)


CPU = [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2, "tensor_parallel_size": 1}]


def test_workload_is_sampled_from_the_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = parse_job(_job(tmp_path, tiny_model_dir, CPU))
    w = workload_from_job(job, sample_rows=100)
    assert w.rows == 300 and w.output_len_mean == 20 and w.output_len_max == 20
    assert 10 <= w.input_len_mean <= 50  # 40..200 bytes at four bytes a token
    assert w.input_len_max == 50


def test_chat_template_is_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tiny_model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    count = token_counter(str(tiny_model_dir))
    plain = count("x" * 40)
    chat = count([{"role": "user", "content": "x" * 40}])
    assert plain == 10 and chat > plain


def test_plan_job_honours_pins(tmp_path: Path, tiny_model_dir: Path) -> None:
    job = parse_job(_job(tmp_path, tiny_model_dir, CPU))
    plan = plan_job(job, sample_rows=50)
    (pool,) = plan.pools
    assert pool.instances == 2 and pool.config.tensor_parallel_size == 1
    assert pool.config.max_num_seqs == 32
    assert plan.est_time_s is not None and plan.output_tokens_per_s > 0


def test_plan_command_with_a_job(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = _write(tmp_path, _job(tmp_path, tiny_model_dir, CPU))
    table = CliRunner().invoke(plan_command, [path])
    assert table.exit_code == 0, table.output
    assert "out tok/s" in table.output and "cpu" in table.output
    as_json = CliRunner().invoke(plan_command, [path, "--json", "--sample-rows", "20"])
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.output)
    assert plan["pools"][0]["instances"] == 2 and plan["pools"][0]["max_num_seqs"] == 32


@pytest.mark.parametrize(("model", "pools", "words"), [
    ("TINY", [{"name": "p", "accelerator": "tpu-v9", "devices_per_node": 1}],
     "unknown accelerator"),
    ("no-such/model-7b", CPU, "unknown model"),
    ("llama-3.1-405b", [{"name": "p", "accelerator": "L4", "devices_per_node": 1}],
     "fits in no pool"),
])
def test_job_errors_are_one_line(
    tmp_path: Path, tiny_model_dir: Path, model: str, pools: list, words: str
) -> None:
    path = _write(tmp_path, _job(tmp_path, tiny_model_dir if model == "TINY" else model, pools))
    result = CliRunner().invoke(plan_command, [path])
    assert result.exit_code == UserError.exit_code
    assert words in result.output and result.output.count("\n") == 1


def test_missing_job_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(plan_command, [str(tmp_path / "nope.yaml")])
    assert result.exit_code == UserError.exit_code and "not found" in result.output


def test_pools_of_different_contexts_are_planned_for_the_rows_they_receive(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from hetbatch.planning import job_plan_inputs

    pools = [{"name": n, "accelerator": "cpu", "devices_per_node": 1, "tensor_parallel_size": 1,
              "engine_args": {"max_model_len": ctx}} for n, ctx in (("small", 50), ("big", 512))]
    inputs = job_plan_inputs(parse_job(_job(tmp_path, tiny_model_dir, pools)), sample_rows=300)
    small, big = inputs.pool_workloads["small"], inputs.pool_workloads["big"]
    assert small.input_len_max + 20 <= 50 < big.input_len_max + 20  # long rows: big only
    assert small.rows + big.rows == pytest.approx(300, abs=2)
    assert big.input_len_mean > small.input_len_mean
    same = [{**p, "engine_args": {"max_model_len": 512}} for p in pools]
    assert job_plan_inputs(parse_job(_job(tmp_path, tiny_model_dir, same))).pool_workloads == {}
