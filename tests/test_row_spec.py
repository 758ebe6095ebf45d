"""Job-file fields for what a row asks for: each mistake is one line naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from hetbatch.errors import UserError
from hetbatch.spec import parse_job


def _job(**extra: Any) -> dict[str, Any]:
    job = {
        "model": {"path": "m"},
        "input": {"path": "in.parquet", "prompt_column": "prompt"},
        "output": {"path": "out"},
        "cluster": {"pools": [{"name": "a", "accelerator": "cpu", "devices_per_node": 1}]},
    }
    job.update(extra)
    return job


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"sampling": {"n": 0}}, "job: sampling.n must be a whole number of samples per row"),
        ({"sampling": {"n": 2.5}}, "job: sampling.n must be a whole number"),
        ({"sampling": {"logprobs": "x"}}, "job: sampling.logprobs must be a number of top tokens"),
        ({"sampling": {"prompt_logprobs": -2}}, "job: sampling.prompt_logprobs must be"),
        (
            {"sampling": {"structured_outputs": {"regex": "a"}}},
            "job: sampling.structured_outputs: set `structured_output` instead",
        ),
        (
            {"structured_output": {"regex": "a", "choice": ["a"]}},
            "job: structured_output: give exactly one of json_schema, regex and choice",
        ),
        ({"structured_output": {}}, "job: structured_output: give exactly one of"),
        ({"structured_output": {"regex": "(a"}}, "job: structured_output: regex does not compile"),
        (
            {"structured_output": {"json_schema": "{oops"}},
            "job: structured_output: json_schema is not valid JSON",
        ),
        (
            {"structured_output": {"json_schema": {"type": "objekt"}}},
            "job: structured_output: json_schema is not a valid JSON schema",
        ),
        ({"structured_output": {"choice": []}}, "job: structured_output.choice: List should"),
        ({"structured_output": {"grammar": "x"}}, "job: structured_output.grammar: unknown key"),
        ({"row_overrides": {"top_k": "k"}}, "job: row_overrides.top_k: unknown key"),
        ({"task": "rerank"}, "job: task: Input should be 'generate', 'embed' or 'classify'"),
        ({"task": "embed", "sampling": {"n": 2}}, "job: sampling.n does not apply to task embed"),
        (
            {"task": "classify", "structured_output": {"choice": ["a"]}},
            "job: structured_output does not apply to task classify",
        ),
        ({"row_overrides": {"stop": 3}}, "job: row_overrides.stop: Input should be a valid string"),
    ],
)
def test_bad_row_fields_are_one_line(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as info:
        parse_job(_job(**extra))
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_good_row_fields_parse() -> None:
    job = parse_job(
        _job(
            sampling={"n": 4, "logprobs": 2, "prompt_logprobs": 0, "max_tokens": 8},
            structured_output={"json_schema": '{"type": "object"}'},
        )
    )
    assert job.samples_per_row == 4
    assert job.structured_output is not None
    assert job.structured_output.constraint() == {"json": {"type": "object"}}


def test_override_columns_are_read_and_checked(tmp_path) -> None:
    """The columns a job names in row_overrides must exist in the input (one line, exit 2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hetbatch.io.parquet import open_dataset
    from hetbatch.prompts import input_columns

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "limit": [3]}), src)
    job = parse_job(
        _job(input={"path": str(src), "prompt_column": "prompt"},
             row_overrides={"max_tokens": "limit", "stop": "stops"})
    )
    assert input_columns(job) == ["prompt", "limit", "stops"]
    with pytest.raises(UserError, match="column 'stops' not found"):
        open_dataset(str(src), input_columns(job))


def test_prices_for_every_pool_or_none() -> None:
    pools = [
        {"name": "a", "accelerator": "cpu", "devices_per_node": 1, "price_per_device_hour": 2.0},
        {"name": "b", "accelerator": "cpu", "devices_per_node": 1},
    ]
    with pytest.raises(UserError) as info:
        parse_job(_job(cluster={"pools": pools}))
    assert str(info.value) == (
        "job: cluster: pool 'b' has no price_per_device_hour: price every pool or none"
    )
    pools[0]["price_per_device_hour"] = -1
    with pytest.raises(UserError, match=r"cluster.pools\[0\].price_per_device_hour: Input"):
        parse_job(_job(cluster={"pools": pools}))


def test_resume_refuses_a_changed_row_shape(tmp_path) -> None:
    """Structured output, overrides and the task define the output: a resume with another
    value is refused (one line, exit 2) rather than mixing two schemas in one dataset."""
    from tests.jobutil import make_input, run_cli, sim_job, sim_pool, write_job

    src = make_input(tmp_path / "in.parquet", 200)
    job = sim_job(tmp_path, src, [sim_pool("a", 20000)])
    assert run_cli("run", str(write_job(tmp_path / "a.yaml", job))).returncode == 0
    job["structured_output"] = {"choice": ["yes", "no"]}
    result = run_cli("run", str(write_job(tmp_path / "b.yaml", job)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "holds the output of a job with a different `structured_output`; use --overwrite to "
        "start over, or another output path"
    )
    del job["structured_output"]
    assert run_cli("run", str(write_job(tmp_path / "c.yaml", job))).returncode == 0


def test_an_output_written_before_newer_fields_resumes(tmp_path) -> None:
    """An output whose job.json predates optional fields (of the input section, or whole
    sections) resumes: the missing fields count as their defaults."""
    import json

    from tests.jobutil import make_input, run_cli, sim_job, sim_pool, write_job

    src = make_input(tmp_path / "in.parquet", 200)
    job_file = write_job(tmp_path / "a.yaml", sim_job(tmp_path, src, [sim_pool("a", 20000)]))
    assert run_cli("run", str(job_file)).returncode == 0
    record_path = tmp_path / "out" / "_hetbatch" / "job.json"
    record = json.loads(record_path.read_text())
    for section in (record["output_defining"], record["spec"]):
        for field in ("id_is_key", "cast_prompt"):
            del section["input"][field]
        for field in ("task", "structured_output", "row_overrides"):
            section.pop(field, None)
    record_path.write_text(json.dumps(record))
    again = run_cli("run", str(job_file))
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout + again.stderr
