"""Instances that span nodes on the loopback Slurm cluster: each instance is one allocation of
two nodes, `srun` starts one process per node, only the head node's worker joins the coordinator.
The simulated engine stands in for vLLM (the processes, link and failure paths are the same)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
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
from tests.slurm.test_submit import _logs, _submit, wait_all

if TYPE_CHECKING:
    from slurm.testcluster.cluster import LoopbackSlurm

pytestmark = pytest.mark.slurm


def _job_file(tmp: Path, rows: int) -> Path:
    job = sim_job(
        tmp,
        make_input(tmp / "in.parquet", rows),
        [sim_pool("big", 6_000, nodes=2, tensor_parallel_size=2), sim_pool("small", 2_000)],
        scheduler={"max_unit_rows": 200},
        launch={"max_worker_restarts": 1},
    )
    return write_job(tmp / "job.yaml", job)


def test_a_pool_of_two_node_instances_runs_a_job(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 12_000
    out = tmp_path / "out"
    _submit(_job_file(tmp_path, rows))
    states = wait_all(slurm_cluster, out, timeout=120)
    assert set(states.values()) == {"COMPLETED"}, _logs(out)
    df = assert_exactly_once(out, rows)
    assert set(df["instance"].unique()) == {"big-0-0", "small-0-0"}
    assert df.filter(pl.col("instance") == "big-0-0").height > rows // 2  # 3x the capacity
    log = next((out / "_hetbatch" / "logs").glob("hetbatch-big-*.out")).read_text()
    assert "started big-0-0" in log


def _node_process(out: Path, pool: str, node_id: str) -> int:
    """The pid of the pool's node entry point that Slurm started on node rank `node_id`."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True)
    for line in ps.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if "hetbatch.launch.slurm.node" in args and str(out) in args and f"--pool {pool}" in args:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_NODEID={node_id}".encode() in environ:
                return int(pid)
    raise AssertionError(f"no node process of {pool} on node {node_id}")


def test_killing_one_nodes_process_restarts_the_instance_whole(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 40_000
    out = tmp_path / "out"
    _submit(_job_file(tmp_path, rows))
    wait_for(lambda: any(r["instance"] == "big-0-0" for r in ledger(out)), 90, "big commits")
    os.kill(_node_process(out, "big", "1"), signal.SIGKILL)
    killed_at = time.time()
    states = wait_all(slurm_cluster, out, timeout=240)
    assert set(states.values()) == {"COMPLETED"}, (states, _logs(out))
    assert_exactly_once(out, rows)
    assert any(r["redealt"] for r in ledger(out))  # its leases went back and were dealt again
    logs = _logs(out)
    assert "hetbatch: instance step 0 ended" in logs
    assert logs.count("started big-0-0") >= 4  # both nodes started it, in both steps (or more)
    back = [r for r in ledger(out) if r["instance"] == "big-0-0" and r["leased_at"] > killed_at]
    assert back, "the instance did not come back"

