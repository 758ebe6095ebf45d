"""User mistakes: one clear line naming the culprit, exit code 2, nothing written."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobutil import make_input, run_cli, sim_job, sim_pool, write_job


def _job(tmp_path, **changes):
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 50), [sim_pool("a", 1000)])
    job.update(changes)
    return job


def _fails_cleanly(tmp_path, job_file, expected: str) -> None:
    result = run_cli("run", str(job_file))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda j: j.update(sampling_params={"max_tokens": 3}), "sampling_params: unknown key"),
        (
            lambda j: j["cluster"]["pools"][0].update(devices_per_node="two"),
            "cluster.pools[0].devices_per_node: Input should be a valid integer",
        ),
        (lambda j: j.pop("output"), "output: required field is missing"),
        (
            lambda j: j["input"].update(path="/nonexistent/x.parquet"),
            "/nonexistent/x.parquet: input path does not exist",
        ),
        (lambda j: j["input"].update(prompt_column="question"), "column 'question' not found"),
        (lambda j: j.update(prompt_template="Q: {question}"), "column 'question' not found"),
    ],
    ids=[
        "typo-key",
        "wrong-type",
        "missing-field",
        "missing-input",
        "missing-column",
        "template-column",
    ],
)
def test_bad_job(tmp_path, mutate, expected) -> None:
    job = _job(tmp_path)
    mutate(job)
    _fails_cleanly(tmp_path, write_job(tmp_path / "job.yaml", job), expected)


def test_corrupt_parquet(tmp_path) -> None:
    job = _job(tmp_path)
    (tmp_path / "in.parquet").write_bytes(b"PAR1 this is not parquet")
    _fails_cleanly(tmp_path, write_job(tmp_path / "job.yaml", job), "not a readable Parquet file")


def test_empty_dataset(tmp_path) -> None:
    job = _job(tmp_path)
    pq.write_table(
        pa.table(
            {
                "id": pa.array([], pa.string()),
                "prompt": pa.array([], pa.string()),
                "topic": pa.array([], pa.string()),
            }
        ),
        tmp_path / "in.parquet",
    )
    _fails_cleanly(tmp_path, write_job(tmp_path / "job.yaml", job), "has no rows")


def test_mismatched_schemas(tmp_path) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    make_input(folder / "a.parquet", 10)
    pq.write_table(pa.table({"id": [1], "prompt": ["x"], "topic": ["t"]}), folder / "b.parquet")
    job = _job(tmp_path)
    job["input"]["path"] = str(folder)
    _fails_cleanly(tmp_path, write_job(tmp_path / "job.yaml", job), "b.parquet: schema differs")


def test_invalid_yaml_and_missing_job_file(tmp_path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("model: [unclosed\n")
    _fails_cleanly(tmp_path, bad, "job.yaml: line")
    _fails_cleanly(tmp_path, tmp_path / "nope.yaml", "nope.yaml: job file not found")


JOB_MISTAKES = [
    (
        lambda j: j["sampling"].update(temprature=0.5),
        "sampling.temprature: unknown field, did you mean temperature?",
    ),
    (
        lambda j: j["sampling"].update(temperature=-1),
        "sampling.temperature: Input should be greater than or equal to 0, got -1",
    ),
    (
        lambda j: j["sampling"].update(max_tokens="ten"),
        "sampling.max_tokens: Input should be a valid integer, got 'ten'",
    ),
    (
        lambda j: j["sampling"].update(min_tokens=9, max_tokens=4),
        "sampling.min_tokens: must not exceed max_tokens (9 > 4)",
    ),
    (
        lambda j: j.setdefault("model", {}).update(engine_args={"max_num_seq": 8}),
        "model.engine_args.max_num_seq: not an argument of vLLM 0.32.0's EngineArgs, "
        "did you mean max_num_seqs",
    ),
    (
        lambda j: j["cluster"]["pools"][0].update(engine_args={"max_num_seqs": "8"}),
        "cluster.pools[0].engine_args.max_num_seqs: expected an integer, got '8'",
    ),
    (
        lambda j: j["cluster"]["pools"][0].update(engine_args={"max_model_len": 0}),
        "cluster.pools[0].engine_args.max_model_len: expected a positive number of tokens, got 0",
    ),
    (
        lambda j: j["cluster"]["pools"][0].update(accelerator="H10O"),
        "cluster.pools[0].accelerator: unknown accelerator 'H10O', did you mean H100 SXM?",
    ),
]
MISTAKE_IDS = ["typo", "range", "type", "between-fields", "engine-arg", "engine-arg-type",
               "context", "accelerator"]


@pytest.mark.parametrize("command", ["run", "plan", "simulate", "submit"])
@pytest.mark.parametrize(("mutate", "expected"), JOB_MISTAKES, ids=MISTAKE_IDS)
def test_job_mistakes_fail_before_anything_starts(tmp_path, command, mutate, expected) -> None:
    """Every command refuses the job with one line naming the field; nothing is written, and
    `submit` stops before it looks for Slurm."""
    job = _job(tmp_path)
    mutate(job)
    job_file = write_job(tmp_path / "job.yaml", job)
    result = run_cli(command, str(job_file))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"job.yaml: {expected}" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_job_defines_its_own_accelerator(tmp_path) -> None:
    job = _job(tmp_path)
    job["cluster"]["pools"][0]["accelerator"] = "TPU-v9"
    job["accelerators"] = {"TPU-v9": {"memory_gib": 95, "memory_bw_gbps": 2765,
                                      "bf16_tflops": 459, "interconnect_gbps": 600}}
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "_SUCCESS").exists()
