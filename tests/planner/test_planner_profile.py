"""`hetbatch profile` on the real engine: a calibration that moves the plan toward the timings."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from hetbatch.cli.profile import profile_command
from hetbatch.planning import load_calibration, plan_job
from hetbatch.profiling.harness import RUN_WEIGHT, default_out
from hetbatch.spec import load_job


def _job(tmp_path: Path, model: Path) -> Path:
    prompts = [f"Tell me about the number {i}." for i in range(64)]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    job = {
        "model": {"path": str(model), "engine_args": {
            "dtype": "float32", "enforce_eager": True, "max_model_len": 128,
            "kv_cache_memory_bytes": 16 * 2**20, "max_num_seqs": 4}},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 8, "temperature": 0.8},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1}]},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.vllm
def test_profile_writes_a_calibration_the_plan_uses(tmp_path: Path, tiny_model: Path) -> None:
    job_path = _job(tmp_path, tiny_model)
    result = CliRunner().invoke(
        profile_command, [str(job_path), "--concurrency", "1,4", "--run-rows", "64"]
    )
    assert result.exit_code == 0, result.output
    out = default_out(str(job_path))
    assert out == tmp_path / "tiny.calibration.json" and out.exists()
    cal = load_calibration(out)
    # Two concurrencies and a long-prompt point of the engine alone, and the short real run
    # through `hetbatch run` (counted RUN_WEIGHT times).
    assert cal.measurements["cpu"] == 3 + RUN_WEIGHT
    assert sum(1 for line in result.output.splitlines() if line.startswith("cpu")) == 6

    measured = _measured_rate(result.output, concurrency=4)
    job = load_job(job_path)
    before = plan_job(job).pools[0].capacity_weight
    after = plan_job(job, calibration=cal).pools[0].capacity_weight
    assert after != before
    assert abs(after - measured) < abs(before - measured)


def _measured_rate(report: str, concurrency: int) -> float:
    """Output tokens/s of the first report row at that concurrency (the job's own shape)."""
    for line in report.splitlines():
        parts = line.split()
        if parts[:2] == ["cpu", str(concurrency)]:
            out_len, seconds = float(parts[3]), float(parts[4])
            return concurrency * out_len / seconds
    raise AssertionError(f"no row at concurrency {concurrency} in:\n{report}")
