"""Healing at run time: workers that are told to stop, hang, fail to write or fail to start
give their work back and the job carries on, each row once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.jobutil import (
    assert_exactly_once,
    busy_worker,
    ledger,
    make_input,
    sim_job,
    sim_pool,
    start_cli,
    wait_for,
    write_job,
)


def test_sigterm_gives_leases_back_at_once(tmp_path: Path) -> None:
    rows = 6_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        scheduler={"max_unit_rows": 300, "lease_timeout_s": 300},
    )
    out = tmp_path / "out"
    proc = start_cli("run", str(write_job(tmp_path / "job.yaml", job)), "--no-progress")
    wait_for(lambda: len(ledger(out)) >= 2, 60, "first commits")
    victim = ledger(out)[-1]["instance"]
    os.kill(busy_worker(proc.pid, out), signal.SIGTERM)
    stopped_at = time.time()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"worker {victim} stopped on SIGTERM, its leases given back; restarting (1/2)" in stderr
    assert_exactly_once(out, rows)
    log = (out / "_hetbatch" / "logs" / f"{victim}.log").read_text()
    assert "lease(s) given back [" in log, log
    # Its rows were dealt again long before a lease could lapse (300 s).
    redealt = [r for r in ledger(out) if r.get("redealt")]
    assert redealt, "no unit was re-dealt"
    assert all(r["at"] - stopped_at < 60 for r in redealt)


def test_hung_engine_gives_leases_back_and_is_restarted(tmp_path: Path) -> None:
    rows = 6_000
    hang = tmp_path / "hang-now"
    pools = [sim_pool("a", 4_000), sim_pool("b", 4_000)]
    for pool in pools:
        pool["sim"]["hang_file"] = str(hang)  # whichever engine sees it first hangs
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        pools,
        scheduler={"max_unit_rows": 300, "lease_timeout_s": 300},
        engine={"hang_timeout_s": 2},
    )
    out = tmp_path / "out"
    proc = start_cli("run", str(write_job(tmp_path / "job.yaml", job)), "--no-progress")
    wait_for(lambda: len(ledger(out)) >= 2, 60, "first commits")
    hang.touch()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not hang.exists()  # an engine took it, and hung
    line = next(x for x in stderr.splitlines() if "found its engine hung" in x)
    assert line.endswith("gave its leases back; restarting (1/2)"), stderr
    victim = line.split()[1]
    log = (out / "_hetbatch" / "logs" / f"{victim}.log").read_text()
    assert "engine hung: no step finished in 2 s" in log, log
    assert_exactly_once(out, rows)
    assert any(r.get("redealt") for r in ledger(out))
