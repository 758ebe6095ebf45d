"""`hetbatch submit` against the loopback Slurm cluster: pools as real Slurm jobs, elastic
workers, a resubmitted coordinator, real vLLM inside an allocation, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pytest

from tests.jobutil import (
    TINY_ENGINE_ARGS,
    assert_exactly_once,
    ledger,
    make_input,
    sim_job,
    sim_pool,
    wait_for,
    write_job,
)

if TYPE_CHECKING:
    from slurm.testcluster.cluster import LoopbackSlurm

pytestmark = pytest.mark.slurm

HETBATCH = [sys.executable, "-m", "hetbatch"]


def hetbatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HETBATCH, *args], capture_output=True, text=True, timeout=120, env=env
    )


def submitted(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "_hetbatch" / "slurm.json").read_text())["jobs"]


def job_ids(out: Path, role: str | None = None, pool: str | None = None) -> list[str]:
    return [
        j["id"]
        for j in submitted(out)
        if (role is None or j["role"] == role) and (pool is None or j.get("pool") == pool)
    ]


def wait_all(cluster: LoopbackSlurm, out: Path, timeout: float = 60) -> dict[str, str]:
    """Wait for every submitted job to end by itself; their final states, with logs on failure."""
    states = {}
    for job_id in job_ids(out):
        try:
            states[job_id] = cluster.wait_job(int(job_id), timeout=timeout).state
        except Exception as exc:
            raise AssertionError(f"{exc}\n{_logs(out)}") from None
    return states


def _logs(out: Path) -> str:
    parts = []
    for p in sorted((out / "_hetbatch" / "logs").glob("*.out")):
        parts.append(f"--- {p.name}\n{p.read_text()[-3000:]}")
    return "\n".join(parts)


def _submit(job_file: Path, *args: str) -> subprocess.CompletedProcess:
    result = hetbatch("submit", str(job_file), *args)
    assert result.returncode == 0, result.stderr
    return result


def test_two_pools_at_different_speeds(slurm_cluster: LoopbackSlurm, tmp_path: Path) -> None:
    rows = 16_000
    gpu = sim_pool("a100", 20_000, devices_per_node=2, tensor_parallel_size=1)
    gpu.update(accelerator="A100", slurm={"partition": "gpu"})
    job = sim_job(
        tmp_path, make_input(tmp_path / "in.parquet", rows), [gpu, sim_pool("cpu", 8_000)]
    )
    out = tmp_path / "out"
    result = _submit(write_job(tmp_path / "job.yaml", job))
    assert "submitted pool-a100" in result.stdout
    assert set(wait_all(slurm_cluster, out).values()) == {"COMPLETED"}, _logs(out)
    df = assert_exactly_once(out, rows)
    shares = df.group_by("instance").len().sort("instance")
    by = dict(zip(shares["instance"], shares["len"], strict=True))
    assert set(by) == {"a100-0-0", "a100-0-1", "cpu-0-0"}
    # Each A100 instance runs at 2.5x the cpu one: it does clearly more rows per second it is
    # at work (Slurm starts the pool jobs at different moments, so totals alone depend on that).
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())["instances"]
    speed = {k: m["rows"] / m["active_s"] for k, m in metrics.items() if m["active_s"] > 0}
    assert min(speed["a100-0-0"], speed["a100-0-1"]) > 1.5 * speed["cpu-0-0"], (by, speed)
    log = next((out / "_hetbatch" / "logs").glob("hetbatch-a100-*.out")).read_text()
    assert "a100-0-0 on devices [0]" in log and "a100-0-1 on devices [1]" in log
    status = hetbatch("status", str(out))
    assert status.returncode == 0 and status.stdout.startswith("complete: 16,000 of 16,000")
    assert "coordinator    COMPLETED" in status.stdout


def test_held_pool_joins_late_and_takes_work(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 12_000
    late = sim_pool("late", 10_000, slurm={"extra": ["--hold"]})
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("early", 6_000), late],
        scheduler={"max_unit_rows": 200},
    )
    out = tmp_path / "out"
    _submit(write_job(tmp_path / "job.yaml", job))
    (late_id,) = job_ids(out, pool="late")
    wait_for(lambda: len(ledger(out)) >= 3, 60, "the early pool's first commits")
    assert slurm_cluster.job_state(int(late_id)) == "PENDING"
    assert "PENDING (JobHeldUser)" in hetbatch("status", str(out)).stdout
    slurm_cluster.run(["scontrol", "release", late_id])
    assert set(wait_all(slurm_cluster, out).values()) == {"COMPLETED"}, _logs(out)
    df = assert_exactly_once(out, rows)
    late_rows = df.filter(pl.col("instance") == "late-0-0").height
    assert late_rows > rows // 10, late_rows


def test_cancelled_worker_job_loses_only_its_leases(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 12_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 8_000), sim_pool("b", 8_000)],
        scheduler={"max_unit_rows": 200},
    )
    out = tmp_path / "out"
    _submit(write_job(tmp_path / "job.yaml", job))
    wait_for(lambda: {r["instance"] for r in ledger(out)} >= {"a-0-0", "b-0-0"}, 60, "commits")
    (b_id,) = job_ids(out, pool="b")
    slurm_cluster.run(["scancel", b_id])
    states = wait_all(slurm_cluster, out)
    assert states[b_id] == "CANCELLED"
    assert states[job_ids(out, role="coordinator")[0]] == "COMPLETED", _logs(out)
    df = assert_exactly_once(out, rows)
    assert df.filter(pl.col("instance") == "a-0-0").height > rows // 2


def test_coordinator_killed_and_resubmitted_resumes(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    rows = 12_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 6_000), sim_pool("b", 6_000)],
        scheduler={"max_unit_rows": 200},
    )
    job_file = write_job(tmp_path / "job.yaml", job)
    out = tmp_path / "out"
    _submit(job_file)
    (first,) = job_ids(out, role="coordinator")
    workers = set(job_ids(out, role="pool"))
    wait_for(lambda: len(ledger(out)) >= 4, 60, "a few committed units")
    slurm_cluster.run(["scancel", first])
    slurm_cluster.wait_job(int(first), timeout=20)
    time.sleep(1.0)  # the workers notice and wait for a new coordinator
    before = ledger(out)
    assert not (out / "_SUCCESS").exists()
    again = _submit(job_file)
    assert again.stdout.count("submitted ") == 1 and "submitted coordinator" in again.stdout
    assert set(job_ids(out, role="pool")) == workers  # the running workers were kept
    states = wait_all(slurm_cluster, out)
    assert states[first] == "CANCELLED"
    assert all(states[j] == "COMPLETED" for j in job_ids(out) if j != first), (states, _logs(out))
    assert_exactly_once(out, rows)
    assert ledger(out)[: len(before)] == before  # committed units kept, never redone
    assert "coordinator restarted" in _logs(out)


def test_real_vllm_pool_inside_slurm(
    slurm_cluster: LoopbackSlurm, tmp_path: Path, tiny_model: Path
) -> None:
    rows = 200
    src = make_input(tmp_path / "in.parquet", rows, row_group_size=50)
    job = sim_job(
        tmp_path,
        src,
        [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1,
          "tensor_parallel_size": 1}],
        scheduler={"max_unit_rows": 64, "heartbeat_s": 0.5},
    )
    job["engine"] = {"kind": "vllm"}
    job["model"] = {
        "path": str(tiny_model),
        "engine_args": dict(TINY_ENGINE_ARGS),
    }
    out = tmp_path / "out"
    env = {**os.environ, "LD_PRELOAD": "/nonexistent/libleak.so"}  # must not reach the job
    result = hetbatch("submit", str(write_job(tmp_path / "job.yaml", job)), env=env)
    assert result.returncode == 0, result.stderr
    assert set(wait_all(slurm_cluster, out, timeout=170).values()) == {"COMPLETED"}, _logs(out)
    df = assert_exactly_once(out, rows)
    assert df["error"].null_count() == rows
    assert (df["completion_tokens"] > 0).all() and df["generated_text"].null_count() == 0
    assert "libleak" not in _logs(out)


def test_dry_run_prints_each_pools_sbatch_lines(tmp_path: Path) -> None:
    a100 = sim_pool("a100", 1000, devices_per_node=8, tensor_parallel_size=2)
    a100.update(
        accelerator="A100",
        slurm={"partition": "gpu", "constraint": "a100_80g", "extra": ["--exclusive"]},
    )
    l40s = sim_pool("l40s", 1000, devices_per_node=4, nodes=3, tensor_parallel_size=1)
    l40s.update(accelerator="L40S", slurm={"gres_type": "l40s_48g", "qos": "low"})
    cpu = sim_pool("cpu", 1000, devices_per_node=16, tensor_parallel_size=16)
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", 1000),
        [a100, l40s, cpu],
        slurm={"account": "ml", "time": "12:00:00", "partition": "cpu"},
    )
    job_file = write_job(tmp_path / "job.yaml", job)
    result = hetbatch("submit", str(job_file), "--dry-run", env={**os.environ, "PATH": "/none"})
    assert result.returncode == 0, result.stderr
    scripts = dict(
        part.split("\n", 1) for part in result.stdout.split("# ---- ") if part.strip()
    )
    assert set(scripts) == {
        "coordinator.sbatch",
        "pool-a100.sbatch",
        "pool-l40s.sbatch",
        "pool-cpu.sbatch",
    }
    lines = {name: set(text.splitlines()) for name, text in scripts.items()}
    assert {
        "#SBATCH --partition=cpu",
        "#SBATCH --account=ml",
        "#SBATCH --time=12:00:00",
        "#SBATCH --requeue",
        "#SBATCH --cpus-per-task=1",
    } <= lines["coordinator.sbatch"]
    assert {
        "#SBATCH --gres=gpu:a100:8",
        "#SBATCH --nodes=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --constraint=a100_80g",
        "#SBATCH --exclusive",
        "#SBATCH --account=ml",
        "#SBATCH --requeue",
    } <= lines["pool-a100.sbatch"]
    assert "4 instance(s) on each of 1 node(s)" in scripts["pool-a100.sbatch"]
    assert {
        "#SBATCH --gres=gpu:l40s_48g:4",
        "#SBATCH --array=0-2",
        "#SBATCH --qos=low",
    } <= lines["pool-l40s.sbatch"]
    assert {"#SBATCH --cpus-per-task=16"} <= lines["pool-cpu.sbatch"]
    assert not any("gres" in line for line in lines["pool-cpu.sbatch"])
    assert f"{sys.executable} -m hetbatch.launch.slurm.node" in scripts["pool-cpu.sbatch"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing

    het = hetbatch("submit", str(job_file), "--dry-run", "--hetjob")
    assert het.returncode == 0, het.stderr
    assert het.stdout.count("#SBATCH hetjob") == 2  # a component per pool, none more
    assert het.stdout.index("--pool l40s") < het.stdout.index("--pool a100")  # most nodes first
    assert "srun --het-group=2 --ntasks-per-node=1" in het.stdout and "--pool cpu" in het.stdout
    assert "#SBATCH --nodes=3" in het.stdout  # no arrays inside a heterogeneous job


def test_hetjob_runs_every_pool_together(slurm_cluster: LoopbackSlurm, tmp_path: Path) -> None:
    """Three pools in one heterogeneous job on the three nodes: the cpu pool is listed first,
    yet must not take n1 or n2, the only nodes with two a100s or two l40s."""
    rows = 6_000
    gpus = []
    for kind in ("l40s", "a100"):
        pool = sim_pool(kind, 20_000, devices_per_node=2, tensor_parallel_size=1)
        pool.update(accelerator=kind.upper(), slurm={"partition": "gpu"})
        gpus.append(pool)
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("cpu", 8_000), *gpus],
        scheduler={"max_unit_rows": 200},
    )
    out = tmp_path / "out"
    result = _submit(write_job(tmp_path / "job.yaml", job), "--hetjob")
    assert result.stdout.count("submitted ") == 1 and "submitted hetjob" in result.stdout
    (het_id,) = job_ids(out, role="hetjob")
    try:
        done = slurm_cluster.wait_job(int(het_id), timeout=60)
    except Exception as exc:
        reasons = slurm_cluster.run(["squeue", "-h", "-o", "%i %T %r"], check=False).stdout
        raise AssertionError(f"{exc}\n{reasons}\n{_logs(out)}") from None
    assert done.state == "COMPLETED", _logs(out)
    assert sorted(done.nodes) == ["n1", "n2", "n3"]  # one node per component
    df = assert_exactly_once(out, rows)
    by_pool = df.group_by(pl.col("instance").str.split("-").list.first()).len()
    rows_by_pool = dict(zip(by_pool["instance"], by_pool["len"], strict=True))
    assert set(rows_by_pool) == {"cpu", "l40s", "a100"} and min(rows_by_pool.values()) > 0
    assert "coordinator on " in _logs(out)


def test_refused_submission_leaves_nothing(slurm_cluster: LoopbackSlurm, tmp_path: Path) -> None:
    bad = sim_pool("bad", 1000, slurm={"partition": "nosuchpart"})
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", 1000),
        [sim_pool("good", 1000), bad],
        slurm={"job_name": "refused-job"},
    )
    job_file = write_job(tmp_path / "job.yaml", job)
    result = hetbatch("submit", str(job_file))
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "invalid partition" in result.stderr.lower()
    assert "Traceback" not in result.stderr
    queued = slurm_cluster.run(["squeue", "-h", "-t", "all", "-o", "%j %T"]).stdout
    mine = [line for line in queued.splitlines() if line.startswith("refused-job")]
    assert all(line.endswith("CANCELLED") for line in mine), mine  # coordinator, pool good
    assert not (tmp_path / "out").exists()

    no_slurm = hetbatch("submit", str(job_file), env={**os.environ, "PATH": "/nonexistent"})
    assert no_slurm.returncode == 1
    assert no_slurm.stderr.strip() == (
        "hetbatch: sbatch not found on PATH: is Slurm installed on this machine?"
    )
    assert not (tmp_path / "out").exists()
