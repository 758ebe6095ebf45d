"""The error budget: a job whose rows mostly fail stops with its most common error (exit 1),
keeping what it committed; bad rows in a sound job do not stop it."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.error_budget import BudgetConfig, ErrorBudget
from tests.jobutil import ledger, read_output, run_cli, sim_job, sim_pool, write_job


def test_all_of_the_first_rows_fail() -> None:
    budget = ErrorBudget()
    assert budget.record(64, 64, "prompt is empty", 64, now=1.0) is None
    verdict = budget.record(64, 64, "prompt is empty", 64, now=2.0)
    assert verdict is not None and verdict.at == 2.0
    assert verdict.message() == (
        "all of the first 128 rows failed; most common error (128 rows): prompt is empty"
    )
    assert budget.record(64, 0, None, 0, now=3.0) is verdict  # spent stays spent


def test_one_good_row_among_the_first_is_not_all() -> None:
    budget = ErrorBudget()
    assert budget.record(64, 63, "x", 63, 0.0) is None
    assert budget.record(64, 64, "x", 64, 0.0) is None


def test_rate_over_any_window_of_a_thousand_rows() -> None:
    budget = ErrorBudget(BudgetConfig(max_error_rate=0.5))
    for _ in range(20):  # 2,000 sound rows, a few errors
        assert budget.record(100, 5, "too long", 5, 0.0) is None
    for _ in range(5):  # then 500 rows fail: the last 1,000 hold 525 errors
        verdict = budget.record(100, 100, "bad template", 100, 0.0)
    assert verdict is not None
    assert verdict.reason.startswith("525 of 1,000 consecutive rows failed (52%")
    assert verdict.top_error == "bad template" and verdict.top_error_rows == 500


def test_exactly_the_rate_is_within_budget_and_one_never_stops() -> None:
    half = ErrorBudget(BudgetConfig(max_error_rate=0.5))
    assert all(half.record(100, 50, "e", 50, 0.0) is None for _ in range(30))
    never = ErrorBudget(BudgetConfig(max_error_rate=1.0))
    assert all(never.record(100, 100, "e", 100, 0.0) is None for _ in range(30))


def test_a_short_job_whose_every_row_fails_stops() -> None:
    budget = ErrorBudget(rows_to_run=40)
    assert budget.record(20, 20, "e", 20, 0.0) is None
    assert budget.record(20, 20, "e", 20, 0.0) is not None


def test_error_texts_are_bounded() -> None:
    budget = ErrorBudget(BudgetConfig(max_error_rate=1.0))
    for i in range(10_000):
        budget.record(1, 1, f"error {i}", 1, 0.0)
    assert len(budget._texts) <= 64


def _input(path, rows: int, bad_share: float) -> None:
    prompts = ["   " if i % 100 < bad_share * 100 else f"hello {i}" for i in range(rows)]
    ids = [f"r{i:06d}" for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "topic": ["t"] * rows}), path,
                   row_group_size=500)


def _run(tmp_path, rows: int, bad_share: float, **extra):
    _input(tmp_path / "in.parquet", rows, bad_share)
    job = sim_job(tmp_path, tmp_path / "in.parquet", [sim_pool("a", 20000, devices_per_node=2)],
                  scheduler={"max_unit_rows": 64}, **extra)
    return run_cli("run", "--no-progress", str(write_job(tmp_path / "job.yaml", job)))


@pytest.mark.parametrize("rows", [5000, 40])
def test_a_job_whose_every_row_fails_stops(tmp_path, rows) -> None:
    result = _run(tmp_path, rows, 1.0)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hetbatch: job failed: all of the first ")
    assert "most common error" in last and "prompt is empty" in last
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists()
    kept = ledger(out)
    assert kept and sum(r["end"] - r["start"] for r in kept) == read_output(out).height
    if rows > 1000:
        assert read_output(out).height < rows // 2  # stopped early, not at the end


def test_bad_rows_within_budget_do_not_stop_the_job(tmp_path) -> None:
    result = _run(tmp_path, 3000, 0.4)
    assert result.returncode == 0, result.stderr
    assert "1,200 rows have an error value" in result.stdout
    assert (tmp_path / "out" / "_SUCCESS").exists()


def test_max_error_rate_from_the_job(tmp_path) -> None:
    (tmp_path / "strict").mkdir()
    stopped = _run(tmp_path / "strict", 3000, 0.4, max_error_rate=0.3)
    assert stopped.returncode == 1 and "more than max_error_rate 30%" in stopped.stderr
    (tmp_path / "lenient").mkdir()
    accepted = _run(tmp_path / "lenient", 300, 1.0, max_error_rate=1.0)
    assert accepted.returncode == 0, accepted.stderr
    assert "300 rows have an error value" in accepted.stdout


def test_errors_that_differ_in_numbers_count_as_one() -> None:
    budget = ErrorBudget()
    budget.record(50, 50, "prompt is 612 tokens, longer than the model's context of 512", 1, 0.0)
    verdict = budget.record(50, 50, "prompt is 700 tokens, longer than the model's context of 512",
                            1, 0.0)
    assert verdict is not None and verdict.top_error_rows == 2
    assert verdict.top_error == "prompt is 612 tokens, longer than the model's context of 512"
