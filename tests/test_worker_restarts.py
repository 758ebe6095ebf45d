"""The worker supervisor of `hetbatch run` (the Slurm node runs the same one): a worker that dies
is restarted within the job's budget, and a run whose workers all died fails with their log."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.jobutil import (
    assert_exactly_once,
    busy_worker,
    ledger,
    make_input,
    sim_job,
    sim_pool,
    start_run,
    worker_pids,
    write_job,
)


def test_killed_worker_is_restarted_and_the_job_completes(tmp_path: Path) -> None:
    rows = 6_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        launch={"max_worker_restarts": 1},
        scheduler={"max_unit_rows": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 2)
    victim_id = ledger(out)[-1]["instance"]
    os.kill(busy_worker(proc.pid, out), signal.SIGKILL)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"worker {victim_id} exited (-9); restarting (1/1)" in stderr
    assert_exactly_once(out, rows)
    log = (out / "_hetbatch" / "logs" / f"{victim_id}.log").read_text()
    assert log.count(f"started {victim_id} on devices [0]") == 2  # the same log, both lives


def test_run_fails_when_every_worker_died(tmp_path: Path) -> None:
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", 200_000),
        [sim_pool("a", 2_000), sim_pool("b", 2_000)],
        launch={"max_worker_restarts": 0},
        scheduler={"max_unit_rows": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 1, "--no-progress")
    for pid in worker_pids(proc.pid).values():
        os.kill(pid, signal.SIGKILL)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "hetbatch: job failed: every worker failed; last log" in stderr
    assert "no restarts left" in stderr
    assert not (out / "_SUCCESS").exists()
