"""A job's mistakes on the real vLLM engine (CPU, tiny model): a typo'd sampling field stops the
job before an engine starts; a job whose every row fails stops with its most common error."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.validate import JobError, _check_sampling_with_vllm
from tests.jobutil import TINY_ENGINE_ARGS, ledger, read_output, run_cli, write_job

pytestmark = pytest.mark.vllm


def _job(tmp: Path, model: Path, prompts: list[str], **extra) -> Path:
    src = tmp / "in.parquet"
    ids = [f"r{i:04d}" for i in range(len(prompts))]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), src, row_group_size=100)
    job = {
        "model": {"path": str(model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_tokens": 8},
        "output": {"path": str(tmp / "out")},
        "scheduler": {"max_unit_rows": 32, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1,
                               "tensor_parallel_size": 1}]},
        **extra,
    }
    return write_job(tmp / "job.yaml", job)


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"temprature": 0.5}, "sampling.temprature: unknown field, did you mean temperature?"),
        (
            {"temperature": -1},
            "sampling.temperature: Input should be greater than or equal to 0, got -1",
        ),
        ({"max_tokens": "ten"}, "sampling.max_tokens: Input should be a valid integer, got 'ten'"),
    ],
)
@pytest.mark.parametrize("command", ["run", "submit"])
def test_sampling_mistake_stops_before_the_engine(
    tmp_path, tiny_model, command, sampling, expected
) -> None:
    job = _job(tmp_path, tiny_model, ["hello"] * 10, sampling={"max_tokens": 8, **sampling})
    result = run_cli(command, str(job))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [f"hetbatch: {job}: {expected}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sampling", "field", "words"),
    [
        ({"temprature": 0.5}, "sampling.temprature", "unknown field, did you mean temperature?"),
        ({"temperature": -1}, "sampling.temperature", "temperature must be non-negative"),
        ({"max_tokens": "ten"}, "sampling.max_tokens", "expected int | null, got str"),
        ({"top_p": 0}, "sampling.top_p", "top_p must be in (0, 1]"),
    ],
)
def test_the_real_sampling_params_name_the_field(sampling, field, words) -> None:
    """What a machine with another vLLM version than the mirror's gets: vLLM's own verdict."""
    with pytest.raises(JobError) as err:
        _check_sampling_with_vllm(sampling)
    assert err.value.field == field and words in err.value.message


def test_a_job_whose_every_row_fails_stops_on_vllm(tmp_path, tiny_model) -> None:
    """Every prompt is longer than the model's context: the job stops after the first 100
    rows, exit 1, with the most common error; what it committed stays, and no _SUCCESS."""
    prompts = ["many words " * (600 + i) for i in range(400)]
    result = run_cli("run", "--no-progress", str(_job(tmp_path, tiny_model, prompts)))
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hetbatch: job failed: all of the first ")
    assert "most common error (" in last and "longer than the model's context of 512" in last
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists()
    committed = sum(r["end"] - r["start"] for r in ledger(out))
    assert 100 <= committed < 400 and read_output(out).height == committed
