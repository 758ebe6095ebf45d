"""Rows dealt by the context they need, live: pools whose engines hold different contexts.

With the simulated engine (a token is about four bytes of prompt) the rows of a job need 10 to
about 800 tokens of context; the small pool's engines hold 64, the big pool's 512. Long rows
must run on the big pool only, rows too long for both are row errors, every row is written
exactly once, and a killed job resumes with nothing lost or redone.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from hetbatch.engines.simulated import approx_tokens
from tests.jobutil import (
    ledger,
    read_output,
    run_cli,
    sim_job,
    sim_pool,
    start_cli,
    wait_for,
    worker_pids,
    write_job,
)

MAX_TOKENS = 8
SMALL, BIG = 64, 512


def routed_input(path: Path, rows: int) -> tuple[Path, list[int]]:
    """Short rows, one in 10 long (~200 tokens), one in 97 too long for any engine (~800); rows
    1,000 to 1,299 all long (units of the small pool that keep none of their rows)."""
    prompts = []
    for i in range(rows):
        long = i % 10 == 3 or 1000 <= i < 1300
        words = 160 if long else 640 if i % 97 == 5 else 1 + i % 20
        prompts.append(" ".join(["word"] * words) + f" {i}")
    ids = [f"r{i:06d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), path, row_group_size=500)
    return path, [approx_tokens(p) + MAX_TOKENS for p in prompts]


def routed_job(tmp: Path, rows: int, **extra) -> tuple[Path, list[int]]:
    input_path, needs = routed_input(tmp / "in.parquet", rows)
    job = sim_job(
        tmp, input_path,
        [sim_pool("small", 20_000, engine_args={"max_model_len": SMALL}),
         sim_pool("big", 3_000, engine_args={"max_model_len": BIG})],
        input={"keep_columns": []},
        scheduler={"max_unit_rows": 200},
        **extra,
    )
    return write_job(tmp / "job.yaml", job), needs


def assert_routed_once(out: Path, needs: list[int]) -> pl.DataFrame:
    """Every row once, each on an engine that holds it, rows no engine holds as errors; the
    ledger's bands cover each row's need exactly once."""
    rows = len(needs)
    assert (out / "_SUCCESS").exists()
    df = read_output(out).sort("id")
    assert df.height == rows and df["id"].to_list() == [f"r{i:06d}" for i in range(rows)]
    for i, (instance, error) in enumerate(zip(df["instance"], df["error"], strict=True)):
        if needs[i] > BIG:
            assert error is not None and "no engine of this job holds more" in error, (i, error)
        else:
            assert error is None, (i, error)
            assert needs[i] <= SMALL or instance.startswith("big"), (i, needs[i], instance)
    covered = [0] * rows
    for r in ledger(out):
        top = r.get("top") or 1 << 62
        for i in range(r["start"], r["end"]):
            covered[i] += r.get("above", 0) < max(needs[i], 1) <= top
    assert covered == [1] * rows
    return df


def test_long_rows_run_on_the_big_context_only(tmp_path) -> None:
    rows = 3_000
    job_file, needs = routed_job(tmp_path, rows)
    result = run_cli("run", str(job_file))
    assert result.returncode == 0, result.stderr
    df = assert_routed_once(tmp_path / "out", needs)
    small = df.filter(pl.col("instance").str.starts_with("small")).height
    assert small > rows // 3  # the small engines ran most short rows
    records = ledger(tmp_path / "out")
    assert any(r.get("top") == SMALL for r in records)  # units that handed rows back
    assert any(r.get("above") == SMALL for r in records)  # spans of long rows
    names = {p.name for p in (tmp_path / "out").glob("part-*.need-*.parquet")}
    assert names and all(".need-" in n for n in names)


def test_killed_routed_job_resumes_exactly_once(tmp_path) -> None:
    rows = 8_000
    job_file, needs = routed_job(tmp_path, rows)
    out = tmp_path / "out"
    proc = start_cli("run", str(job_file))
    wait_for(lambda: len(worker_pids(proc.pid)) == 2, 60, "two workers")
    big = worker_pids(proc.pid)["big-0-0"]
    os.kill(big, signal.SIGSTOP)  # long rows handed back wait for it
    try:
        wait_for(lambda: sum(r.get("top") == SMALL for r in ledger(out)) >= 3, 60,
                 "rows handed back")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(big, signal.SIGKILL)
    before = ledger(out)
    assert not (out / "_SUCCESS").exists()
    handed = {(r["start"], r["end"]) for r in before if r.get("top") == SMALL}
    spans = {(r["start"], r["end"]) for r in before if r.get("above") == SMALL}
    assert handed - spans  # long rows handed back and not yet run when the job was killed
    result = run_cli("run", str(job_file))
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    assert_routed_once(out, needs)
    after = ledger(out)
    assert after[: len(before)] == before  # committed units kept, never redone
    keys = [(r["start"], r["end"], r.get("above", 0), r.get("top")) for r in after]
    assert len(keys) == len(set(keys))
    assert not any(a == b for a, b in itertools.pairwise(sorted(keys)))
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    assert metrics["rows_total"] == rows


def test_one_context_hands_nothing_back(tmp_path) -> None:
    """Engines as large as any of the job's keep the rows too long for them: they fail at once
    as row errors, in their units, as before rows were dealt by the context they need."""
    rows = 600
    input_path, needs = routed_input(tmp_path / "in.parquet", rows)
    job = sim_job(tmp_path, input_path,
                  [sim_pool("small", 20_000, devices_per_node=2,
                            engine_args={"max_model_len": SMALL})],
                  input={"keep_columns": []})
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    df = read_output(tmp_path / "out").sort("id")
    assert df["id"].to_list() == [f"r{i:06d}" for i in range(rows)]
    errors = df["error"].to_list()
    assert all((e is not None) == (n > SMALL) for e, n in zip(errors, needs, strict=True))
    assert all("above" not in r for r in ledger(tmp_path / "out"))
