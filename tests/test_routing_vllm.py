"""Rows dealt by the context they need, on the real vLLM engine (CPU, the tiny model): a pool
of engines with max_model_len 128 and one with 512 in one job."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tests.jobutil import (
    TINY_ENGINE_ARGS,
    assert_ledger_covers,
    ledger,
    read_output,
    start_cli,
    wait_for,
    worker_pids,
    write_job,
)

pytestmark = pytest.mark.vllm

SMALL, BIG, MAX_TOKENS = 128, 512, 8


def _input(path: Path, rows: int) -> list[str]:
    """Short rows; one in 8 long (~200 tokens: the big pool only); two too long for both."""
    prompts = []
    for i in range(rows):
        words = 700 if i in (5, rows - 2) else 200 if i % 8 == 3 else 3 + i % 12
        prompts.append(f"row {i}: " + " ".join(["word"] * words))
    ids = [f"r{i:04d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path, row_group_size=40)
    return prompts


def test_long_rows_run_on_the_larger_context_and_too_long_rows_are_errors(
    tmp_path, tiny_model
) -> None:
    rows = 160
    prompts = _input(tmp_path / "in.parquet", rows)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    needs = [len(tokenizer(p)["input_ids"]) + MAX_TOKENS for p in prompts]
    assert any(SMALL < n <= BIG for n in needs) and any(n - MAX_TOKENS >= BIG for n in needs)
    engine = {k: v for k, v in TINY_ENGINE_ARGS.items() if k != "max_model_len"}

    def pool(name: str, context: int) -> dict:
        return {"name": name, "accelerator": "cpu", "devices_per_node": 1,
                "engine_args": {"max_model_len": context}}

    job = {
        "model": {"path": str(tiny_model), "engine_args": engine},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt",
                  "id_column": "id"},
        "sampling": {"max_tokens": MAX_TOKENS, "temperature": 0.8},
        "seed": 3,
        "output": {"path": str(tmp_path / "out")},
        "scheduler": {"max_unit_rows": 32, "heartbeat_s": 0.5},
        "cluster": {"pools": [pool("small", SMALL), pool("big", BIG)]},
    }
    out = tmp_path / "out"
    # The big engine joins only once the small one has run rows and handed long ones back:
    # they wait for it (an engine still starting) instead of being written off as errors.
    proc = start_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    try:
        wait_for(lambda: len(worker_pids(proc.pid)) == 2, 60, "two workers")
        big = worker_pids(proc.pid)["big-0-0"]
        os.kill(big, signal.SIGSTOP)
        try:
            wait_for(lambda: any(r.get("top") == SMALL for r in ledger(out)), 300,
                     "rows handed back")
        finally:
            os.kill(big, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    df = read_output(out).sort("id")
    assert df["id"].to_list() == [f"r{i:04d}" for i in range(rows)]  # every row once
    assert_ledger_covers(out, rows)
    for i, (instance, error, text) in enumerate(
        zip(df["instance"], df["error"], df["generated_text"], strict=True)
    ):
        if needs[i] - MAX_TOKENS >= BIG:
            assert "longer than the model's context of 512" in error, (i, error)
            assert "no engine of this job holds more" in error and text is None
            continue
        assert error is None, (i, error)
        if needs[i] > SMALL:
            assert instance.startswith("big"), (i, needs[i], instance)
    assert df.filter(df["instance"].str.starts_with("small")).height > rows // 2
    records = ledger(out)
    assert any(r.get("top") == SMALL for r in records)  # units of the small pool handed back
    assert any(r.get("above") == SMALL for r in records)  # their long rows, on the big pool
