"""The loopback cluster behaves like the real Slurm features hetbatch relies on."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from slurm.testcluster.cluster import LoopbackSlurm

pytestmark = pytest.mark.slurm

EXPECTED_GRES = {
    "n1": "gpu:a100:2",
    "n2": "gpu:l40s:2",
    "n3": "gpu:a100:1,gpu:l40s:1",
}


def _read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_sinfo_lists_three_idle_nodes_with_gres(slurm_cluster: LoopbackSlurm) -> None:
    # Plain subprocess, no env passed: the fixture exported SLURM_CONF for the session.
    assert os.environ["SLURM_CONF"] == str(slurm_cluster.conf_path)
    out = subprocess.run(
        ["sinfo", "-h", "-N", "-p", "gpu", "-o", "%N %T %G"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    nodes = {
        name: (state, gres) for name, state, gres in (line.split() for line in out.splitlines())
    }
    assert nodes == {name: ("idle", gres) for name, gres in EXPECTED_GRES.items()}
    partitions = slurm_cluster.run(["sinfo", "-h", "-o", "%P"]).stdout.split()
    assert sorted(partitions) == ["cpu*", "gpu"]


def test_gpu_job_sees_its_typed_gpu(slurm_cluster: LoopbackSlurm, tmp_path: Path) -> None:
    env_file = tmp_path / "env.txt"
    job_id = slurm_cluster.sbatch(
        f"#!/bin/bash\nenv > {env_file}\n",
        ["-p", "gpu", "--gres=gpu:a100:1", "-o", str(tmp_path / "out")],
    )
    result = slurm_cluster.wait_job(job_id, timeout=20)
    assert result.state == "COMPLETED", result
    env = _read_env(env_file)
    assert env.get("CUDA_VISIBLE_DEVICES", "") != ""
    assert env.get("SLURM_JOB_GPUS", "") != ""
    assert env.get("SLURM_GPUS_ON_NODE") == "1"
    assert env["SLURMD_NODENAME"] in ("n1", "n3")  # the nodes that have an a100


def test_sbatch_wait_returns_failing_exit_code(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    proc = slurm_cluster.run(
        ["sbatch", "--wait", "--parsable", "-o", str(tmp_path / "out"), "--wrap", "exit 7"],
        check=False,
    )
    assert proc.returncode == 7, proc.stderr
    result = slurm_cluster.wait_job(int(proc.stdout.strip()), timeout=10)
    assert (result.state, result.exit_code) == ("FAILED", 7)


def test_unknown_partition_is_refused(slurm_cluster: LoopbackSlurm) -> None:
    proc = slurm_cluster.run(["sbatch", "-p", "nosuchpart", "--wrap", "true"], check=False)
    assert proc.returncode != 0
    assert "invalid partition" in proc.stderr.lower()


def test_heterogeneous_job_runs_both_components(
    slurm_cluster: LoopbackSlurm, tmp_path: Path
) -> None:
    script = f"""#!/bin/bash
#SBATCH -p gpu --gres=gpu:a100:1 -o {tmp_path}/out
#SBATCH hetjob
#SBATCH -p gpu --gres=gpu:l40s:1
for g in 0 1; do
    srun --het-group=$g bash -c 'echo "$SLURMD_NODENAME $CUDA_VISIBLE_DEVICES"' \
        > {tmp_path}/component-$g
done
"""
    job_id = slurm_cluster.sbatch(script)
    result = slurm_cluster.wait_job(job_id, timeout=30)
    assert result.state == "COMPLETED", (result, (tmp_path / "out").read_text())
    assert len(result.records) == 2
    seen = {}
    for group in (0, 1):
        node, gpus = (tmp_path / f"component-{group}").read_text().split()
        seen[group] = node
        assert gpus != ""
    assert seen[0] in ("n1", "n3") and seen[1] in ("n2", "n3")
    assert seen[0] != seen[1]  # components of one hetjob never share a node
    assert result.nodes == [seen[0], seen[1]]


def test_held_job_waits_for_release(slurm_cluster: LoopbackSlurm, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch("#!/bin/bash\ntrue\n", ["--hold", "-o", str(tmp_path / "out")])
    time.sleep(1.5)  # more than bf_interval: the scheduler had its chances to start it
    records = slurm_cluster.job_records(job_id)
    assert records[0]["JobState"] == "PENDING"
    assert records[0]["Reason"] == "JobHeldUser"
    slurm_cluster.run(["scontrol", "release", str(job_id)])
    assert slurm_cluster.wait_job(job_id, timeout=15).state == "COMPLETED"


def test_stop_kills_jobs_and_restart_in_same_dir_works(
    make_slurm_cluster: Callable[..., LoopbackSlurm], tmp_path: Path
) -> None:
    cluster = make_slurm_cluster()
    cluster.start()
    pid_file = tmp_path / "job.pid"
    job_id = cluster.sbatch(
        f"#!/bin/bash\necho $$ > {pid_file}\nexec sleep 300\n", ["-o", str(tmp_path / "out")]
    )
    deadline = time.monotonic() + 15
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, cluster.job_state(job_id)
        time.sleep(0.1)
    job_pid = int(pid_file.read_text())
    daemons = cluster.status().daemons
    assert set(daemons) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2", "slurmd-n3"}

    cluster.stop()
    for pid in [job_pid, *daemons.values()]:
        assert not _alive(pid), pid
    assert not cluster.status().running

    cluster.start()
    assert cluster.status().running
    second = cluster.sbatch("#!/bin/bash\ntrue\n", ["-o", str(tmp_path / "out2")])
    assert cluster.wait_job(second, timeout=15).state == "COMPLETED"
    cluster.stop()
    assert cluster.status().daemons == {}


def _alive(pid: int) -> bool:
    """True if ``pid`` runs; zombies (left for PID 1 to reap) do not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")
