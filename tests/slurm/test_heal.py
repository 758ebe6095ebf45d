"""Pool jobs on the loopback Slurm that are signalled or run out of time: their workers give
their leases back at once, the other pool takes the rows, and a job submitted with --requeue
(as pool jobs are) comes back after its time limit and rejoins."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.jobutil import (
    assert_exactly_once,
    ledger,
    make_input,
    sim_job,
    sim_pool,
    wait_for,
    write_job,
)
from tests.slurm.test_submit import _logs, _submit, job_ids, wait_all

if TYPE_CHECKING:
    from slurm.testcluster.cluster import LoopbackSlurm

pytestmark = pytest.mark.slurm


def _two_pools(tmp_path: Path, rows: int, tokens_per_s: float, b_slurm: dict) -> Path:
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", tokens_per_s), sim_pool("b", tokens_per_s, slurm=b_slurm)],
        # Leases far longer than the test: rows can only come back through the workers.
        scheduler={"max_unit_rows": 200, "lease_timeout_s": 900},
    )
    return write_job(tmp_path / "job.yaml", job)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _coordinator_log(out: Path) -> str:
    return next((out / "_hetbatch" / "logs").glob("hetbatch-coordinator-*.out")).read_text()


def test_scancel_signal_term_gives_leases_back(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 12_000
    out = tmp_path / "out"
    _submit(_two_pools(tmp_path, rows, 4_000, {}))
    wait_for(lambda: {r["instance"] for r in ledger(out)} >= {"a-0-0", "b-0-0"}, 60, "commits")
    (b_id,) = job_ids(out, pool="b")
    # --full: a one-node pool runs in the batch step, which plain `--signal` leaves out.
    slurm_cluster.run(["scancel", "--signal=TERM", "--full", b_id])
    ended = slurm_cluster.wait_job(int(b_id), timeout=20)
    assert (ended.state, ended.exit_code) == ("FAILED", 143), _logs(out)
    states = wait_all(slurm_cluster, out, timeout=90)
    assert set(states.values()) == {"COMPLETED", "FAILED"}, _logs(out)
    assert_exactly_once(out, rows)
    b_log = next((out / "_hetbatch" / "logs").glob(f"hetbatch-b-{b_id}.out")).read_text()
    assert "b-0-0 stopping: " in b_log and "lease(s) given back [" in b_log, b_log
    assert "b-0-0 left holding rows [" in _coordinator_log(out)
    assert "requeued" not in b_log  # signalled, not out of time: it stays gone


def test_time_limit_gives_leases_back_and_requeue_brings_the_worker_back(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 30_000
    out = tmp_path / "out"
    _submit(_two_pools(tmp_path, rows, 1_000, {"time": "1"}))  # b: one minute
    (b_id,) = job_ids(out, pool="b")
    b_log = out / "_hetbatch" / "logs" / f"hetbatch-b-{b_id}.out"
    wait_for(lambda: "requeued" in _text(b_log), 150, "b's time limit")
    out_of_time_at = time.time()
    assert "lease(s) given back [" in b_log.read_text()
    wait_for(lambda: slurm_cluster.job_state(int(b_id)) == "PENDING", 30, "b requeued")
    assert "b-0-0 left holding rows [" in _coordinator_log(out)
    rows_before = sum(r["end"] - r["start"] for r in ledger(out))
    assert rows_before < rows, "the job ended before b's time limit: make it longer"
    # Slurm holds a requeued job back two minutes; let it start as soon as it safely may.
    slurm_cluster.start_requeued_now(int(b_id))
    states = wait_all(slurm_cluster, out, timeout=150)
    assert set(states.values()) == {"COMPLETED"}, (states, _logs(out))
    assert_exactly_once(out, rows)
    back = [r for r in ledger(out) if r["instance"] == "b-0-0" and r["at"] > out_of_time_at]
    assert back, "b never came back to work"
    both_runs = b_log.read_text()  # the second run's output follows the first's
    assert "requeued" in both_runs and both_runs.count("started b-0-0") == 2, both_runs
    record = slurm_cluster.job_records(int(b_id))[0]
    assert record["Restarts"] == "1"
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    assert metrics["rows_total"] == rows
