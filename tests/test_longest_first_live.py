"""Longest first, live: the coordinator reads the job's per-row max_tokens column before the
job starts (`RowBounds`, streamed one row group at a time) and deals the rows that may decode
longest early, however late they sit in the input; each row is written exactly once, across a
kill and a resume too.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.io.parquet import open_dataset, parse_shard, shard_name
from hetbatch.io.row_bounds import BoundsBuilder, read_row_bounds
from hetbatch.scheduler.bounds import RowBounds
from tests.jobutil import (
    TINY_ENGINE_ARGS,
    assert_exactly_once,
    input_table,
    ledger,
    read_output,
    run_cli,
    sim_job,
    sim_pool,
    start_run,
    write_job,
)

ROWS = 6_000
HEAVY = range(5_900, 5_912)  # a few rows near the end that may decode 50 times longer
LIGHT_TOKENS, HEAVY_TOKENS = 8, 400


def heavy_input(path: Path, rows: int = ROWS, nulls: bool = True) -> Path:
    """The test input with a max_tokens column: heavy rows near the end; some null cells (the
    job's max_tokens)."""
    limit = [HEAVY_TOKENS if i in HEAVY else None if nulls and i % 5 == 0 else LIGHT_TOKENS
             for i in range(rows)]
    table = input_table(rows).append_column("limit", pa.array(limit, pa.int64()))
    pq.write_table(table, path, row_group_size=500)
    return path


def heavy_job(tmp: Path, **scheduler) -> Path:
    job = sim_job(
        tmp, heavy_input(tmp / "in.parquet"),
        [sim_pool("a", 3_000, max_num_seqs=16), sim_pool("b", 3_000, max_num_seqs=16)],
        sampling={"max_tokens": LIGHT_TOKENS},
        row_overrides={"max_tokens": "limit"},
        scheduler={"max_unit_rows": 200, **scheduler},
    )
    return write_job(tmp / "job.yaml", job)


@pytest.mark.parametrize("block_rows", [1, 7, 4096])
def test_streamed_bounds_match_the_whole_column(block_rows: int) -> None:
    rng = np.random.default_rng(block_rows)
    needs = rng.integers(1, 50, 10_001)
    needs[rng.integers(0, len(needs), 9)] = 900
    builder = BoundsBuilder(len(needs), block_rows)
    for chunk in np.array_split(needs, 13):
        builder.add(chunk)
    assert builder.bounds() == RowBounds.from_rows(needs, block_rows)


def test_bounds_read_only_the_column_and_default_nulls(tmp_path) -> None:
    path = heavy_input(tmp_path / "in.parquet")
    dataset = open_dataset(str(path), ["limit"])
    bounds = read_row_bounds(dataset, "limit", default_max_tokens=LIGHT_TOKENS, prompt_tokens=5,
                             block_rows=100)
    needs = np.array([HEAVY_TOKENS if i in HEAVY else LIGHT_TOKENS for i in range(ROWS)]) + 5
    assert bounds == RowBounds.from_rows(needs, 100)
    assert bounds.heavy_ranges == ((5_900, 6_000),)
    again = read_row_bounds(dataset, "limit", LIGHT_TOKENS, 5, block_rows=100)
    assert again == bounds  # a resumed job deals by the same bounds


def heavy_position(out: Path) -> tuple[int, int]:
    """The ledger index of the commit that wrote the last heavy row, and the ledger's length."""
    records = ledger(out)
    last = max(i for i, r in enumerate(records)
               for row in HEAVY if r["start"] <= row < r["end"]
               and r.get("above", 0) < HEAVY_TOKENS + 20 <= (r.get("top") or 1 << 62))
    return last, len(records)


def test_heavy_rows_near_the_end_are_committed_early(tmp_path) -> None:
    job_file = heavy_job(tmp_path)
    result = run_cli("run", str(job_file), timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert_exactly_once(out, ROWS)
    last, total = heavy_position(out)
    assert last < total // 2, (last, total)
    split = [r for r in ledger(out) if "above" in r]
    assert split, "no range was split into light and heavy rows"
    names = [p.name for p in out.glob("part-*")]
    assert len(names) == len(set(names)) == len(ledger(out))  # one shard a commit


def test_input_order_without_longest_first(tmp_path) -> None:
    job_file = heavy_job(tmp_path, longest_first=False)
    result = run_cli("run", str(job_file), timeout=240)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert_exactly_once(out, ROWS)
    assert not [r for r in ledger(out) if "above" in r]
    last, total = heavy_position(out)
    assert last >= total // 2, (last, total)


def test_resume_with_longest_first_is_exactly_once(tmp_path) -> None:
    job_file = heavy_job(tmp_path)
    out = tmp_path / "out"
    proc = start_run(job_file, out, 8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ledger(out)
    assert any("above" in r for r in before)  # killed with ranges split in halves
    assert not (out / "_SUCCESS").exists()
    result = run_cli("run", str(job_file), timeout=240)
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    assert_exactly_once(out, ROWS)
    assert ledger(out)[: len(before)] == before
    heavy_position(out)  # the heavy rows were written, once (assert_exactly_once)


def test_split_halves_have_their_own_shards() -> None:
    light = shard_name(5_800, 6_000, above=0, top=45)
    heavy = shard_name(5_800, 6_000, above=45, top=None)
    whole = shard_name(5_800, 6_000)
    assert len({light, heavy, whole}) == 3
    assert parse_shard(light)[2:] == (0, 45) and parse_shard(heavy)[2:] == (45, None)


def test_a_column_of_text_leaves_input_order(tmp_path) -> None:
    path = tmp_path / "in.parquet"
    table = input_table(50).append_column("limit", pa.array(["8", "x"] * 25))
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="not whole numbers"):
        read_row_bounds(open_dataset(str(path), ["limit"]), "limit", 8)


def test_bounds_read_from_object_storage(tmp_path, s3_server) -> None:
    bucket = s3_server.new_bucket()
    local = heavy_input(tmp_path / "in.parquet")
    s3_server.filesystem().put_file(str(local), f"{bucket}/in/a.parquet")
    remote = open_dataset(f"s3://{bucket}/in/", ["limit"], s3_server.storage_options)
    here = open_dataset(str(local), ["limit"])
    assert read_row_bounds(remote, "limit", LIGHT_TOKENS, 5, 100) == read_row_bounds(
        here, "limit", LIGHT_TOKENS, 5, 100)


@pytest.mark.vllm
def test_heavy_rows_go_early_on_vllm(tmp_path, tiny_model) -> None:
    """The real engine on CPU (tiny model): a few rows near the end may write 96 tokens, the
    others 4; the rows that may write most are dealt among the first, every row once."""
    rows, heavy = 640, range(630, 634)
    limit = [96 if i in heavy else 4 for i in range(rows)]
    table = pa.table({"id": [f"r{i:06d}" for i in range(rows)],
                      "prompt": [f"row {i} says" for i in range(rows)], "limit": limit})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=64)
    job = {
        "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt",
                  "id_column": "id"},
        "sampling": {"max_tokens": 4, "ignore_eos": True},
        "row_overrides": {"max_tokens": "limit"},
        "output": {"path": str(tmp_path / "out")},
        "scheduler": {"max_unit_rows": 32, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1,
                               "tensor_parallel_size": 1}]},
    }
    result = run_cli("run", "--no-progress", str(write_job(tmp_path / "job.yaml", job)),
                     timeout=600)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    df = read_output(out).sort("id")
    assert df["id"].to_list() == [f"r{i:06d}" for i in range(rows)]
    assert df["error"].null_count() == rows
    assert df["completion_tokens"].to_list() == limit
    # Here the heavy rows' decode is most of the job: they start first and end last.
    records = sorted(ledger(out), key=lambda r: r["leased_at"])
    last = max(i for i, r in enumerate(records) for row in heavy
               if r["start"] <= row < r["end"] and r.get("above", 0) < 96
               and (r.get("top") or 1 << 62) > 96)
    assert last < len(records) // 4, (last, len(records))


def test_simulate_deals_by_the_jobs_bounds(tmp_path) -> None:
    """`hetbatch simulate` runs each row to its own max_tokens and deals by the job's bounds,
    as `hetbatch run` does: the heavy rows near the end no longer set the makespan."""
    from hetbatch.cli.simulate import predict
    from hetbatch.spec import load_job

    def makespan(**scheduler) -> float:
        return predict(load_job(heavy_job(tmp_path, **scheduler))).makespan

    on, off = makespan(), makespan(longest_first=False)
    assert on < off, (on, off)
