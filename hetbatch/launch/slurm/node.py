"""One node of a pool's allocation: start the instances planned for it, each a worker process on
its share of the devices Slurm gave this node, restart workers that fail, end when they end.

Run by the pool's sbatch script (srun'd once per node for multi-node jobs):

    python -m hetbatch.launch.slurm.node OUTPUT --pool NAME

The node index comes from the array task id (arrays of one-node jobs) or the node's rank in
the step (SLURM_NODEID), so instance ids `{pool}-{node}-{k}` are unique across the pool.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.engines.factory import preload_env
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths
from hetbatch.launch.base import read_layout
from hetbatch.launch.slurm.commands import slurm_env
from hetbatch.launch.span import span_processes
from hetbatch.launch.workers import WorkerSupervisor
from hetbatch.layout import InstanceSpec
from hetbatch.spec import JobSpec, parse_job


def node_index(env: dict[str, str], span: int = 1) -> int:
    """This node's index in the pool. An array task is one node, or with instances that span
    `span` nodes one instance's allocation, within which SLURM_NODEID is the node's rank."""
    task, rank = env.get("SLURM_ARRAY_TASK_ID", ""), env.get("SLURM_NODEID", "")
    if task.isdigit():
        return int(task) * span + (int(rank) if span > 1 and rank.isdigit() else 0)
    return int(rank) if rank.isdigit() else 0


def span_ports(env: dict[str, str]) -> tuple[int, int]:
    """(vLLM master port, link port) of this step's instance: from the job id, its restart
    count and the step id, so that allocations sharing a host, and a step started again after
    one that failed, do not collide."""
    job, restarts, step = (
        int(env.get(k, "0") or 0) if env.get(k, "0").isdigit() else 0
        for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_STEP_ID")
    )
    base = 20000 + ((job * 13 + restarts * 5 + step) % 4000) * 10
    return base, base + 1


def allocated_devices(instance: InstanceSpec, env: dict[str, str]) -> list[int]:
    """The device ids this node may use: the GPUs Slurm bound, or the cores it may run on."""
    if instance.is_cpu:
        return sorted(os.sched_getaffinity(0))
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return []  # no GPU binding: the planned ids are the node's own
    return [int(d) for d in visible.split(",") if d.strip().isdigit()]


def place(instances: list[InstanceSpec], env: dict[str, str]) -> list[InstanceSpec]:
    """Map each instance's planned device slots onto the devices of this allocation."""
    placed = []
    for inst in instances:
        devices = allocated_devices(inst, env)
        if not devices:
            placed.append(inst)
            continue
        if not inst.is_cpu and max(inst.devices) >= len(devices):
            raise UserError(
                f"{inst.instance_id} needs device slot {max(inst.devices)} but Slurm bound "
                f"only {len(devices)} GPU(s) here: {env.get('CUDA_VISIBLE_DEVICES')}"
            )
        # On cpu pools a machine with fewer cores than planned shares them rather than fails.
        mapped = tuple(devices[d % len(devices)] for d in inst.devices)
        placed.append(replace(inst, devices=mapped))
    return placed


class NodeRunner:
    """The worker processes of one node; they find the coordinator through its address file,
    which follows a coordinator resubmitted elsewhere."""

    poll_s = 0.5

    def __init__(
        self, output: str, job: JobSpec, instances: list[InstanceSpec], node: int = 0
    ) -> None:
        self.store = OutputStore(output)
        self.workers = WorkerSupervisor(
            instances,
            [
                "--coordinator-file",
                self.store.url_of(OutputPaths.COORDINATOR),
                "--wait-s",
                str(job.slurm.reconnect_s),
            ],
            # without LD_PRELOAD: the engine sets its own; an inherited one may fail
            {**preload_env(job), **slurm_env()},
            job.launch.max_worker_restarts,
            unresponsive_s=job.engine.hang_timeout_s,
        )
        self._span(output, node)

    def _span(self, output: str, node: int) -> None:
        """This node's process of each instance that spans nodes: the head's worker under the
        link, or a follower; the head is the node that launched the step (rank 0)."""
        env = dict(os.environ)
        host = env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
        master_port, link_port = span_ports(env)
        processes = []
        for w in self.workers.workers:
            rank = w.instance.rank_of(node)
            if not w.instance.spans_nodes or rank is None:
                processes.append(w)
                continue
            processes += span_processes(
                w.instance, [rank], self.workers.worker_argv(w.instance),
                (host, master_port, link_port), output,
            )
        self.workers.workers = processes

    def run(self) -> int:
        self.workers.start()
        try:
            while self.workers.running:
                time.sleep(self.poll_s)
                self.workers.reap(self.store.is_complete)
        finally:
            self.workers.stop(grace_s=0)  # none is left running; this tidies up
        return 1 if self.workers.failed and not self.store.is_complete() else 0

    def terminate(self, signum: int, frame: FrameType | None) -> None:
        """Slurm cancels or preempts the job, or its time is up: stop the workers (they give
        their leases back), and when the time limit ended a requeueable job before the rows
        did, requeue it so that its workers come back. The requeue comes first (Slurm's SIGKILL
        follows within KillWait), the line saying so last: after the workers' own last lines."""
        job_id = os.environ.get("SLURM_JOB_ID")
        requeued = not self.store.is_complete() and requeue_if_out_of_time(job_id)
        self.workers.stop(grace_s=0)
        if requeued:
            print(f"time limit reached: job {job_id} requeued, its workers will come back",
                  flush=True)
        sys.exit(128 + signum)


def requeue_if_out_of_time(job_id: str | None) -> bool:
    """`scontrol requeue` this job if it was submitted with --requeue and its run time has
    reached its time limit (a cancelled job is left alone)."""
    if not job_id:
        return False
    try:
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=20
        ).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        limit = _seconds(fields.get("TimeLimit", ""))
        ran = _seconds(fields.get("RunTime", ""))
        if fields.get("Requeue") != "1" or limit is None or ran is None or ran < limit:
            return False
        requeued = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return requeued.returncode == 0


def _seconds(duration: str) -> int | None:
    """Slurm's [days-]hours:minutes:seconds; None for UNLIMITED or anything else."""
    days, _, clock = duration.rpartition("-")
    parts = clock.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in [*parts, days or "0"]):
        return None
    seconds = 0
    for p in parts:
        seconds = seconds * 60 + int(p)
    return seconds + int(days or 0) * 86400


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output")
    parser.add_argument("--pool", required=True)
    parser.add_argument("--node", type=int, help="node index (default: from Slurm)")
    args = parser.parse_args(argv)
    store = OutputStore(args.output)
    if store.is_complete():
        print(f"{args.output}: the job is complete")
        return 0
    try:
        job = parse_job(store.read_json(OutputPaths.JOB)["spec"], f"{args.output} job.json")
        env = dict(os.environ)
        pool = [i for i in read_layout(store) if i.pool == args.pool]
        span = max((i.nodes for i in pool), default=1)
        node = args.node if args.node is not None else node_index(env, span)
        mine = [i for i in pool if i.rank_of(node) is not None]
        if not mine:
            raise UserError(f"pool {args.pool} has no instances planned on node {node}")
        runner = NodeRunner(args.output, job, place(mine, env), node)
    except (UserError, OSError) as exc:
        print(f"hetbatch node: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, runner.terminate)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
