"""What a row can ask for beyond one completion, through `hetbatch run` on real vLLM (CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobutil import TINY_ENGINE_ARGS, assert_ledger_covers, read_output, run_cli, write_job

pytestmark = pytest.mark.vllm

DATA = Path(__file__).resolve().parents[1] / "data" / "prompts.parquet"


def _input(path: Path, rows: int, **columns: list[Any]) -> Path:
    table = pl.read_parquet(DATA).head(rows).select("id", "prompt").to_arrow()
    for name, values in columns.items():
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, path, row_group_size=50)
    return path


def _job(out: Path, model: Path, src: Path, devices: int = 1, **extra: Any) -> dict:
    job = {
        "model": {"path": str(model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_tokens": 12, "temperature": 0.8},
        "seed": 3,
        "output": {"path": str(out)},
        "scheduler": {"max_unit_rows": 32, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": devices}]},
    }
    job.update(extra)
    return job


def _run(tmp: Path, name: str, job: dict) -> pl.DataFrame:
    result = run_cli("run", str(write_job(tmp / f"{name}.yaml", job)))
    assert result.returncode == 0, result.stderr
    out = Path(job["output"]["path"])
    df = read_output(out).sort("id")
    assert_ledger_covers(out, df.height)
    return df


def test_n_samples_with_logprobs_are_placement_independent(tmp_path, tiny_model) -> None:
    """Three samples per row with log-probabilities; two instances and small units, then one
    instance and large units: every row's samples are the same."""
    rows = 1200  # enough that the second instance is up before the first has done them all
    src = _input(tmp_path / "in.parquet", rows)
    sampling = {"max_tokens": 12, "temperature": 0.9, "n": 3, "logprobs": 2, "prompt_logprobs": 1}
    two = _run(tmp_path, "two", _job(tmp_path / "two", tiny_model, src, 2, sampling=sampling))
    assert two.height == rows and two["error"].null_count() == rows
    assert two["instance"].n_unique() == 2
    for row in two.iter_rows(named=True):
        texts, reasons, counts = (
            row["generated_text"], row["finish_reason"], row["sample_completion_tokens"]
        )
        assert len(texts) == len(reasons) == len(counts) == 3
        assert set(reasons) <= {"length", "stop"}
        assert sum(counts) == row["completion_tokens"]
        assert [len(lp) for lp in row["token_logprobs"]] == counts
        assert all(lp <= 0 for sample in row["token_logprobs"] for lp in sample)
        assert all(len(at) == 2 for sample in row["top_logprobs"] for at in sample)
        top = row["top_logprobs"][0][0]
        assert top[0]["logprob"] >= top[1]["logprob"]
        assert len(row["prompt_logprobs"]) == row["prompt_tokens"]
        assert row["prompt_logprobs"][0] is None and row["prompt_logprobs"][1] <= 0
    # Samples of one row differ (sampled at temperature 0.9, each with its own seed).
    assert (two["generated_text"].list.n_unique() > 1).mean() > 0.9

    one_job = _job(tmp_path / "one", tiny_model, src, 1, sampling=sampling)
    one_job["scheduler"] = {"max_unit_rows": 512}
    one = _run(tmp_path, "one", one_job)
    assert one["instance"].n_unique() == 1
    assert one["generated_text"].to_list() == two["generated_text"].to_list()
    assert one["token_logprobs"].to_list() == two["token_logprobs"].to_list()


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 12},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "score"],
    "additionalProperties": False,
}


def test_json_schema_makes_random_weights_write_valid_json(tmp_path, tiny_model) -> None:
    """Constrained decoding with two samples per row: every sample that stopped on its own has
    the schema's structure; the flag column says exactly which samples a strict JSON parser or
    the schema rejects. (The grammar lets random weights put raw control characters in strings,
    which strict JSON forbids, and bytes that are not UTF-8, which decode as U+FFFD and can make
    a string longer than maxLength: those samples are flagged.)"""
    src = _input(tmp_path / "in.parquet", 40)
    job = _job(
        tmp_path / "out", tiny_model, src,
        sampling={"max_tokens": 120, "temperature": 0.7, "n": 2},
        structured_output={"json_schema": ANSWER_SCHEMA},
    )
    df = _run(tmp_path, "json", job)
    assert df["error"].null_count() == df.height == 40
    samples = [
        (text, reason, flag)
        for row in df.iter_rows(named=True)
        for text, reason, flag in zip(
            row["generated_text"], row["finish_reason"], row["structured_error"], strict=True
        )
    ]
    assert len(samples) == 80
    stopped = [(text, flag) for text, reason, flag in samples if reason == "stop"]
    assert len(stopped) > 40, "most constrained samples should finish their document"
    import json

    import jsonschema

    matching = 0
    for text, flag in stopped:
        assert set(json.loads(text, strict=False)) == {"answer", "score"}
        try:
            valid = jsonschema.Draft202012Validator(ANSWER_SCHEMA).is_valid(json.loads(text))
        except json.JSONDecodeError:
            valid = False
        assert (flag is None) == valid, (text, flag)
        matching += valid
    assert matching > 0.5 * len(stopped)
    for _text, reason, flag in samples:
        if reason == "length":
            assert flag is not None and "cut off at max_tokens" in flag


def test_choice_and_regex_constraints(tmp_path, tiny_model) -> None:
    src = _input(tmp_path / "in.parquet", 30)
    choice = _run(tmp_path, "choice", _job(
        tmp_path / "choice", tiny_model, src,
        structured_output={"choice": ["positive", "negative", "neutral"]},
    ))
    assert set(choice["generated_text"]) <= {"positive", "negative", "neutral"}
    assert choice["structured_error"].null_count() == 30
    regex = _run(tmp_path, "regex", _job(
        tmp_path / "regex", tiny_model, src,
        sampling={"max_tokens": 16, "temperature": 1.0},
        structured_output={"regex": "[A-Z]{2}-[0-9]{3}"},
    ))
    assert regex["generated_text"].str.contains(r"^[A-Z]{2}-[0-9]{3}$").all()
    assert regex["structured_error"].null_count() == 30


def test_per_row_overrides_from_columns(tmp_path, tiny_model) -> None:
    """Rows set their own max_tokens, temperature, stop strings and JSON schema; null cells
    keep the job's sampling; a bad cell is that row's error, naming the column."""
    rows = 48
    schema = '{"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}'
    max_tokens = [None if i % 3 == 0 else 2 + i % 5 for i in range(rows)]
    temperature = [0.0 if i % 4 == 0 else None for i in range(rows)]
    stop = [[" ", "e"] if i % 2 and i % 6 != 1 else None for i in range(rows)]
    schemas = [schema if i % 6 == 1 else None for i in range(rows)]
    max_tokens[5], schemas[7] = -1, "{not json"
    src = _input(
        tmp_path / "in.parquet", rows,
        row_max=max_tokens, row_temp=temperature, row_stop=stop, row_schema=schemas,
    )
    # The same prompt under every id: greedy rows (temperature 0) must then agree.
    table = pq.read_table(src)
    same = pa.array([table.column("prompt")[0].as_py()] * rows)
    pq.write_table(table.set_column(1, "prompt", same), src)
    job = _job(
        tmp_path / "out", tiny_model, src,
        sampling={"max_tokens": 40, "temperature": 1.0},
        row_overrides={
            "max_tokens": "row_max", "temperature": "row_temp",
            "stop": "row_stop", "json_schema": "row_schema",
        },
    )
    df = _run(tmp_path, "rows", job)
    by_id = {r["id"]: r for r in df.iter_rows(named=True)}
    ids = pl.read_parquet(src)["id"].to_list()
    assert by_id[ids[5]]["error"] == "column 'row_max': max_tokens must be a positive whole number"
    assert by_id[ids[7]]["error"].startswith("column 'row_schema': json_schema is not valid JSON")
    ok = [(i, by_id[ids[i]]) for i in range(rows) if i not in (5, 7)]
    assert all(r["error"] is None for _, r in ok)
    for i, r in ok:
        limit = max_tokens[i] or 40
        assert r["completion_tokens"] <= limit
        if r["finish_reason"] == "length":
            assert r["completion_tokens"] == limit
        if stop[i]:
            assert " " not in r["generated_text"] and "e" not in r["generated_text"]
        if schemas[i] is not None and r["finish_reason"] == "stop":
            import json

            assert "k" in json.loads(r["generated_text"], strict=False)
        if schemas[i] is None:
            assert r["structured_error"] is None
    assert sum(r["finish_reason"] == "stop" for i, r in ok if stop[i]) > 5
    # Greedy rows with the same prompt and limit agree, whatever their seeds.
    greedy = {}
    for i, r in ok:
        if temperature[i] == 0.0 and schemas[i] is None:
            greedy.setdefault((max_tokens[i], bool(stop[i])), set()).add(r["generated_text"])
    assert greedy and all(len(texts) == 1 for texts in greedy.values())
    sampled = {r["generated_text"] for i, r in ok if temperature[i] is None and not stop[i]}
    assert len(sampled) > 3


def test_embed_and_classify_give_one_vector_per_row(tmp_path, tiny_model, tiny_classifier) -> None:
    """Pooling tasks through the same scheduling: two instances, then one, the same vectors;
    a row that cannot run is still that row's error."""
    import numpy as np

    rows = 3000  # enough that the second instance is up before the first has done them all
    src = _input(tmp_path / "in.parquet", rows)
    table = pq.read_table(src)
    prompts = table.column("prompt").to_pylist()
    prompts[4] = None
    pq.write_table(table.set_column(1, "prompt", pa.array(prompts)), src)
    two = _run(tmp_path, "embed2", _job(tmp_path / "embed2", tiny_model, src, 2, task="embed"))
    assert two["instance"].n_unique() == 2
    assert "generated_text" not in two.columns
    assert two.filter(pl.col("error").is_not_null())["error"].to_list() == ["prompt is null"]
    good = two.filter(pl.col("error").is_null())
    vectors = np.array(good["embedding"].to_list())
    assert vectors.shape == (rows - 1, 128)  # the tiny model's hidden size
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)  # normalized
    distinct_prompts = good.join(pl.read_parquet(src), on="id")["prompt"].n_unique()
    assert len({tuple(np.round(v, 4)) for v in vectors}) == distinct_prompts
    one_job = _job(tmp_path / "embed1", tiny_model, src, 1, task="embed")
    one_job["scheduler"] = {"max_unit_rows": 512}
    one = _run(tmp_path, "embed1", one_job).filter(pl.col("error").is_null())
    assert np.allclose(np.array(one["embedding"].to_list()), vectors, atol=1e-4)

    def class_scores(name: str, devices: int) -> np.ndarray:
        job = _job(tmp_path / name, tiny_classifier, src, devices, task="classify")
        scored = _run(tmp_path, name, job).filter(pl.col("error").is_null())
        return np.array(scored["class_scores"].to_list())

    probs = class_scores("cls2", 2)
    assert probs.shape == (rows - 1, 2)  # the head's two labels
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert probs.min() > 0.0 and probs.max() < 1.0  # a trained-size head, not saturated
    assert np.allclose(class_scores("cls1", 1), probs, atol=1e-4)  # wherever a row ran


def test_classify_refuses_a_generative_checkpoint_without_a_head(tmp_path, tiny_model) -> None:
    """vLLM would score with a layer it creates but never loads: refused before any engine."""
    src = _input(tmp_path / "in.parquet", 10)
    job = _job(tmp_path / "out", tiny_model, src, task="classify")
    result = run_cli("run", str(write_job(tmp_path / "cls.yaml", job)), timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "task: classify needs a classification head" in line
    assert str(tiny_model / "config.json") in line and "LlamaForCausalLM" in line
    assert not (tmp_path / "out").exists()
    job["model"]["engine_args"] = {
        **job["model"]["engine_args"], "hf_overrides": {"classifier_from_token": ["a", "b"]},
    }
    result = run_cli("plan", str(write_job(tmp_path / "cls.yaml", job)), timeout=120)
    assert result.returncode == 0, result.stderr


def test_cost_per_pool_and_overall(tmp_path, tiny_model) -> None:
    """Two priced pools: metrics.json and the summary give dollars, tokens per dollar and
    dollars per million output tokens, from the prices and the run's wall time."""
    import json

    src = _input(tmp_path / "in.parquet", 1500)
    pools = [
        {"name": "fast", "accelerator": "cpu", "devices_per_node": 1, "price_per_device_hour": 3.0},
        {"name": "cheap", "accelerator": "cpu", "devices_per_node": 1,
         "price_per_device_hour": 0.75},
    ]
    job = _job(tmp_path / "out", tiny_model, src, cluster={"pools": pools})
    result = run_cli("run", str(write_job(tmp_path / "cost.yaml", job)))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "out" / "_hetbatch" / "metrics.json").read_text())
    cost, instances = metrics["cost"], metrics["instances"].values()
    hours = cost["wall_s"] / 3600
    assert cost["wall_s"] == pytest.approx(metrics["wall_s"], abs=0.01)
    for name, price in (("fast", 3.0), ("cheap", 0.75)):
        pool = cost["pools"][name]
        # dollars are kept to 6 decimals: a run of seconds costs fractions of a cent
        assert pool["dollars"] == pytest.approx(price * hours, rel=1e-4, abs=1e-6)
        out = sum(m["completion_tokens"] for m in instances if m["pool"] == name)
        prompt = sum(m["prompt_tokens"] for m in instances if m["pool"] == name)
        assert pool["output_tokens"] == out
        assert pool["tokens_per_dollar"] == pytest.approx((out + prompt) / pool["dollars"], 1e-3)
        per_million = pool["dollars_per_million_output_tokens"]
        # A pool whose instance came up after the other had done every row made no tokens.
        assert per_million == (pytest.approx(pool["dollars"] * 1e6 / out, 1e-3) if out else None)
    overall = cost["overall"]
    assert overall["dollars"] == pytest.approx(3.75 * hours, rel=1e-4, abs=2e-6)
    assert overall["output_tokens"] == sum(m["completion_tokens"] for m in instances) > 0
    assert overall["dollars_per_million_output_tokens"] == pytest.approx(
        overall["dollars"] * 1e6 / overall["output_tokens"], rel=1e-3
    )
    table = result.stdout[result.stdout.index("  cost "):].splitlines()
    names = [line.split()[0] for line in table]
    assert names[0] == "cost" and sorted(names[1:3]) == ["cheap", "fast"] and names[3] == "overall"
    # The summary is taken once the workers have stopped, a moment after metrics.json.
    assert float(table[3].split()[1]) == pytest.approx(overall["dollars"], rel=0.05)
