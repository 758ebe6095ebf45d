"""Whole jobs through `hetbatch run` on the real vLLM engine (CPU) with the tiny model."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobutil import (
    TINY_ENGINE_ARGS,
    assert_ledger_covers,
    busy_worker,
    ledger,
    read_output,
    run_cli,
    start_cli,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.vllm

DATA = Path(__file__).resolve().parents[1] / "data" / "prompts.parquet"
BAD_ROWS = {"bad-null": None, "bad-empty": "   ", "bad-long": "many words " * 600}


def _input(path: Path, rows: int, bad: bool = False, messages: bool = False) -> Path:
    df = pl.read_parquet(DATA).head(rows).select("id", "prompt", "source")
    table = df.to_arrow()
    if bad:
        extra = pa.table(
            {
                "id": list(BAD_ROWS),
                "prompt": list(BAD_ROWS.values()),
                "source": ["bad"] * len(BAD_ROWS),
            }
        )
        table = pa.concat_tables([table.cast(extra.schema), extra])
    if messages:
        msgs = [
            [{"role": "user", "content": p}] if p is not None else None
            for p in table.column("prompt").to_pylist()
        ]
        table = table.append_column("messages", pa.array(msgs))
    pq.write_table(table, path, row_group_size=100)
    return path


def _job(tmp: Path, model: Path, src: Path, devices: int, **extra) -> dict:
    job = {
        "model": {
            "path": str(model),
            "engine_args": dict(TINY_ENGINE_ARGS),
        },
        "input": {
            "path": str(src),
            "prompt_column": "prompt",
            "id_column": "id",
            "keep_columns": ["source"],
        },
        "chat": True,
        "sampling": {"max_tokens": 24, "temperature": 0.8, "top_p": 0.95},
        "seed": 11,
        "output": {"path": str(tmp / "out")},
        "scheduler": {"max_unit_rows": 64, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": devices}]},
    }
    job.update(extra)
    return job


def _check_complete(out: Path, src: Path) -> pl.DataFrame:
    df = read_output(out)
    ids = pq.read_table(src, columns=["id"]).column("id").to_pylist()
    assert df.height == len(ids) and sorted(df["id"].to_list()) == sorted(ids)
    assert_ledger_covers(out, len(ids))
    return df


def test_end_to_end_chat_seeds_and_row_errors(tmp_path, tiny_model) -> None:
    """Two instances with prompts + chat template; then one instance with a messages column.
    Same rows, same per-row seeds: the texts must match whichever instance ran each row."""
    two = tmp_path / "two"
    src = _input(tmp_path / "in.parquet", 1200, bad=True, messages=True)
    result = run_cli("run", str(write_job(tmp_path / "a.yaml", _job(two, tiny_model, src, 2))))
    assert result.returncode == 0, result.stderr
    a = _check_complete(two / "out", src).sort("id")
    assert a["instance"].n_unique() == 2
    good = a.filter(pl.col("error").is_null())
    assert good.height == 1200
    assert (good["completion_tokens"] > 0).all() and (good["prompt_tokens"] > 0).all()
    # Random weights may sample end-of-sequence at once: most rows, not all, have text.
    assert (good["generated_text"].str.len_chars() > 0).mean() > 0.9
    assert set(good["finish_reason"].unique()) <= {"length", "stop"}
    errors = dict(zip(a["id"], a["error"], strict=True))
    assert errors["bad-null"] == "prompt is null"
    assert errors["bad-empty"] == "prompt is empty"
    assert "longer than the model's context of 512" in errors["bad-long"]

    one = tmp_path / "one"
    job = _job(one, tiny_model, src, 1, chat=False)
    job["input"] = {**job["input"], "prompt_column": None, "messages_column": "messages"}
    result = run_cli("run", str(write_job(tmp_path / "b.yaml", job)))
    assert result.returncode == 0, result.stderr
    b = _check_complete(one / "out", src).sort("id")
    assert b["instance"].n_unique() == 1
    same = a.filter(pl.col("error").is_null()).join(b, on="id", suffix="_b")
    assert same.height == 1200
    assert same["generated_text"].to_list() == same["generated_text_b"].to_list()
    assert same["prompt_tokens"].to_list() == same["prompt_tokens_b"].to_list()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    row = same.row(0, named=True)
    prompt = pl.read_parquet(src).filter(pl.col("id") == row["id"])["prompt"][0]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    assert row["prompt_tokens"] == len(tok(rendered)["input_ids"])


def test_resume_after_sigkill(tmp_path, tiny_model) -> None:
    src = _input(tmp_path / "in.parquet", 1500)
    job_file = write_job(tmp_path / "job.yaml", _job(tmp_path, tiny_model, src, 2))
    out = tmp_path / "out"
    proc = start_cli("run", str(job_file))
    wait_for(lambda: len(ledger(out)) >= 3, 180, "a few committed units")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ledger(out)
    assert sum(r["end"] - r["start"] for r in before) < 1500
    result = run_cli("run", str(job_file))
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    _check_complete(out, src)
    assert ledger(out)[: len(before)] == before  # committed units are not redone


def test_killed_worker_unit_is_redealt(tmp_path, tiny_model) -> None:
    src = _input(tmp_path / "in.parquet", 1500)
    job = _job(tmp_path, tiny_model, src, 2, launch={"max_worker_restarts": 0})
    out = tmp_path / "out"
    proc = start_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    wait_for(lambda: len(ledger(out)) >= 2, 180, "first commits")
    victim = busy_worker(proc.pid, out)
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "re-queued" in stderr
    _check_complete(out, src)
