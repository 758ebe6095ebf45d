"""Instances that span nodes: their layout, and a local run where processes stand in for nodes.

vLLM 0.32's CPU backend runs tensor parallelism across two processes on this machine (see the
README); the job runs here use the simulated engine spanning processes, which exercises the same
launch and failure paths (the link between an instance's processes, the head's worker)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from hetbatch.errors import UserError
from hetbatch.layout import device_env, instance_layout
from hetbatch.spec import parse_job
from tests.jobutil import (
    assert_exactly_once,
    ledger,
    make_input,
    run_cli,
    sim_job,
    sim_pool,
    start_cli,
    wait_for,
    write_job,
)


def _job(tmp: Path, rows: int = 10, **extra: object) -> dict:
    return sim_job(
        tmp,
        tmp / "in.parquet",
        [sim_pool("big", 3_000, nodes=4, devices_per_node=8, tensor_parallel_size=8,
                  pipeline_parallel_size=2),
         sim_pool("small", 1_000, nodes=2)],
        **extra,
    )


def test_an_instance_larger_than_a_node_spans_consecutive_nodes(tmp_path: Path) -> None:
    instances = instance_layout(parse_job(_job(tmp_path), "job"))
    big = [i for i in instances if i.pool == "big"]
    assert [(i.instance_id, i.node, i.nodes) for i in big] == [("big-0-0", 0, 2), ("big-2-0", 2, 2)]
    assert big[0].devices == tuple(range(8))
    assert big[0].engine_args == {"tensor_parallel_size": 8, "pipeline_parallel_size": 2,
                                  "distributed_executor_backend": "mp", "nnodes": 2}
    assert [big[1].rank_of(n) for n in range(4)] == [None, None, 0, 1]
    assert [i.nodes for i in instances if i.pool == "small"] == [1, 1]


def test_a_spanning_cpu_instance_binds_one_core_per_rank() -> None:
    (inst, *_) = instance_layout(parse_job(_job(Path("/tmp")), "job"))  # sim pools are cpu
    assert device_env(inst)["VLLM_CPU_OMP_THREADS_BIND"] == "|".join(str(d) for d in range(8))


def test_a_layout_that_does_not_fill_whole_nodes_is_refused(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job["cluster"]["pools"][0]["nodes"] = 3
    with pytest.raises(UserError, match=r"cluster.pools\[0\].*nodes \(3\) must be a multiple of 2"):
        parse_job(job, "job")


def _spanning_run(tmp: Path, rows: int) -> tuple[dict, Path]:
    job = sim_job(
        tmp,
        make_input(tmp / "in.parquet", rows),
        [sim_pool("big", 3_000, nodes=2, tensor_parallel_size=2), sim_pool("small", 1_000)],
        launch={"max_worker_restarts": 2},
        scheduler={"max_unit_rows": 200},
    )
    return job, write_job(tmp / "job.yaml", job)


def test_a_spanning_pool_beside_a_single_node_one_shares_a_job(tmp_path: Path) -> None:
    rows = 4_000
    _job_spec, path = _spanning_run(tmp_path, rows)
    proc = start_cli("run", str(path), "--no-progress")
    _stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    done = {r["instance"] for r in ledger(tmp_path / "out")}
    assert done == {"big-0-0", "small-0-0"}  # one worker for the spanning instance
    assert_exactly_once(tmp_path / "out", rows)
    logs = tmp_path / "out" / "_hetbatch" / "logs"
    assert (logs / "big-0-0.rank1.log").exists()
    big = [r for r in ledger(tmp_path / "out") if r["instance"] == "big-0-0"]
    big_rows = sum(r["end"] - r["start"] for r in big)
    assert big_rows > rows / 2  # dealt by capacity: 3,000 tok/s against 1,000


def _follower_pid(parent: int) -> int:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(parent)],
                         capture_output=True, text=True).stdout
    return next(int(line.split()[0]) for line in out.splitlines()
                if "hetbatch.launch.span follower" in line)


def test_killing_a_follower_takes_its_instance_down_and_its_rows_are_dealt_again(
    tmp_path: Path,
) -> None:
    rows = 20_000
    _job_spec, path = _spanning_run(tmp_path, rows)
    out = tmp_path / "out"
    proc = start_cli("run", str(path), "--no-progress")
    wait_for(lambda: any(r["instance"] == "big-0-0" for r in ledger(out)), 60, "big commits")
    os.kill(_follower_pid(proc.pid), signal.SIGKILL)
    _stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "left holding rows" in stderr  # its leases went back
    assert "worker big-0-0 exited (4); restarting" in stderr  # the head stopped its worker
    head_log = (out / "_hetbatch" / "logs" / "big-0-0.log").read_text()
    assert "a follower left" in head_log
    assert head_log.count("started big-0-0") == 2  # the instance came back whole
    assert_exactly_once(out, rows)
    wait_for(lambda: not _processes_of(out), 15, "every process of the job to exit")


def _processes_of(out: Path) -> list[str]:
    """Command lines of live processes that name the job's output folder (none may linger:
    the killed follower's share of the engine included)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(str(out).encode() in a for a in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def test_example_gpu_job_dry_run_shows_the_spanning_pools_allocation(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "jobs" / "example-gpu-cluster.yaml"
    job = yaml.safe_load(example.read_text())
    job["input"] = {"path": str(make_input(tmp_path / "in.parquet", 100)),
                    "prompt_column": "prompt", "id_column": "id"}
    job["output"] = {"path": str(tmp_path / "out")}
    result = run_cli("submit", str(write_job(tmp_path / "job.yaml", job)), "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout.split("# ---- pool-h100-pp.sbatch")[1].split("# ---- ")[0]
    for line in ("#SBATCH --nodes=2", "#SBATCH --array=0-1", "#SBATCH --gres=gpu:h100:8",
                 "#SBATCH --ntasks-per-node=1"):
        assert line in script.splitlines()
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 " in script
    assert "-m hetbatch.launch.slurm.node" in script and "--pool h100-pp" in script
