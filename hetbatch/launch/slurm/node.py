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
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths
from hetbatch.layout import InstanceSpec, device_env
from hetbatch.spec import JobSpec, parse_job


def node_index(env: dict[str, str]) -> int:
    for key in ("SLURM_ARRAY_TASK_ID", "SLURM_NODEID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    return 0


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
    """The worker processes of one node and their restarts."""

    def __init__(self, output: str, job: JobSpec, instances: list[InstanceSpec]) -> None:
        self.store = OutputStore(output)
        self.job = job
        self.instances = instances
        self.coordinator_file = self.store.url_of(OutputPaths.COORDINATOR)
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {}

    def spawn(self, inst: InstanceSpec) -> None:
        env = {**os.environ, **device_env(inst)}
        env.pop("LD_PRELOAD", None)  # the engine sets its own; an inherited one may not load
        self.procs[inst.instance_id] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hetbatch.worker",
                "--coordinator-file",
                self.coordinator_file,
                "--instance",
                inst.instance_id,
                "--wait-s",
                str(self.job.slurm.reconnect_s),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        print(f"started {inst.instance_id} on devices {list(inst.devices)}", flush=True)

    def run(self) -> int:
        for inst in self.instances:
            self.spawn(inst)
        failed = False
        while self.procs:
            time.sleep(0.5)
            for inst in self.instances:
                proc = self.procs.get(inst.instance_id)
                if proc is None or proc.poll() is None:
                    continue
                del self.procs[inst.instance_id]
                if proc.returncode != 0 and not self.store.is_complete():
                    failed |= not self._restart(inst, proc.returncode)
        return 1 if failed and not self.store.is_complete() else 0

    def _restart(self, inst: InstanceSpec, code: int) -> bool:
        n = self.restarts.get(inst.instance_id, 0)
        if n >= self.job.launch.max_worker_restarts:
            print(f"{inst.instance_id} exited ({code}); no restarts left", file=sys.stderr)
            return False
        self.restarts[inst.instance_id] = n + 1
        print(f"{inst.instance_id} exited ({code}); restarting", file=sys.stderr, flush=True)
        self.spawn(inst)
        return True

    def terminate(self, signum: int, frame: FrameType | None) -> None:
        """Slurm cancels or preempts the job: stop the workers, their leases go back."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        sys.exit(128 + signum)


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
        node = args.node if args.node is not None else node_index(env)
        mine = [
            InstanceSpec(**{**i, "devices": tuple(i["devices"])})
            for i in store.read_json(OutputPaths.LAYOUT)
            if i["pool"] == args.pool and i["node"] == node
        ]
        if not mine:
            raise UserError(f"pool {args.pool} has no instances planned on node {node}")
        runner = NodeRunner(args.output, job, place(mine, env))
    except (UserError, OSError) as exc:
        print(f"hetbatch node: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, runner.terminate)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
