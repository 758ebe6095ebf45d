"""An instance of two processes standing in for two nodes (TP=2 over vLLM's multiprocessing
backend with `nnodes=2`), on the real vLLM engine (CPU) with the tiny model: its greedy output
is the output of one process, and no process of it outlives the run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from tests.jobutil import (
    TINY_ENGINE_ARGS,
    leftover_processes,
    make_input,
    read_output,
    run_cli,
    write_job,
)

pytestmark = pytest.mark.vllm


def _greedy_run(tmp: Path, model: Path, src: Path, pool: dict) -> pl.DataFrame:
    job = {
        "model": {"path": str(model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_tokens": 12, "temperature": 0.0},
        "output": {"path": str(tmp / "out")},
        "scheduler": {"max_unit_rows": 32},
        "launch": {"max_worker_restarts": 0},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", **pool}]},
    }
    tmp.mkdir()
    with leftover_processes() as left:
        done = run_cli("run", str(write_job(tmp / "job.yaml", job)), "--no-progress", timeout=600)
        assert done.returncode == 0, done.stderr
        assert left(wait_s=20) == []  # nothing of the instance outlives the run, on any node
    return read_output(tmp / "out").sort("id")


def test_two_process_tensor_parallel_instance_matches_one_process(tmp_path, tiny_model) -> None:
    src = make_input(tmp_path / "in.parquet", 40)
    one = _greedy_run(tmp_path / "one", tiny_model, src, {"devices_per_node": 1})
    two = _greedy_run(
        tmp_path / "two", tiny_model, src,
        {"devices_per_node": 1, "nodes": 2, "tensor_parallel_size": 2},
    )
    follower = tmp_path / "two" / "out" / "_hetbatch" / "logs" / "cpu-0-0.rank1.log"
    assert "VllmWorker-1" in follower.read_text()  # rank 1 ran in the second process
    columns = ["id", "generated_text", "completion_tokens", "finish_reason"]
    assert two.select(columns).to_dicts() == one.select(columns).to_dicts()
