"""The processes of an instance that spans nodes, and the link that makes them live and die as one.

On its head node (rank 0) an instance runs its ordinary worker, the one process that talks to the
coordinator, under `head`; on each other node `follower` runs the engine's share of the instance
(vLLM's headless multiprocessing executor, or nothing for the simulated engine). The head listens
on a link port and every follower holds a TCP connection to it: when a follower's connection drops
the head stops its worker (its leases go back when the coordinator loses it) and exits; when the
head goes, each follower stops its engine share and exits. vLLM alone would not do this: a
follower outlives its head.

    python -m hetbatch.launch.span head --link-port P --followers N -- WORKER ARGV...
    python -m hetbatch.launch.span follower --link HOST:P --output OUT --instance ID --rank R
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hetbatch.launch.workers import WorkerProcess, die_with_parent
from hetbatch.layout import InstanceSpec

RANK_ENV = "HETBATCH_NODE_RANK"
MASTER_ADDR_ENV = "HETBATCH_MASTER_ADDR"
MASTER_PORT_ENV = "HETBATCH_MASTER_PORT"
HEAD_LOST = 3  # a follower's exit code when its head went away before the job was done
FOLLOWER_LOST = 4  # the head's exit code when a follower went away


def span_env(rank: int, master_addr: str, master_port: int) -> dict[str, str]:
    """What an instance's process on node `rank` needs to find the head for vLLM."""
    return {RANK_ENV: str(rank), MASTER_ADDR_ENV: master_addr, MASTER_PORT_ENV: str(master_port)}


def node_engine_args(engine_args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    """Engine args of this node's share of a spanning instance: its rank and the head's address."""
    if int(engine_args.get("nnodes", 1)) <= 1:
        return engine_args
    return {
        **engine_args,
        "node_rank": int(env.get(RANK_ENV, "0")),
        "master_addr": env.get(MASTER_ADDR_ENV, "127.0.0.1"),
        "master_port": int(env.get(MASTER_PORT_ENV, "29501")),
    }


def head_argv(worker_argv: list[str], link_port: int, followers: int) -> list[str]:
    return [sys.executable, "-m", "hetbatch.launch.span", "head", "--link-port", str(link_port),
            "--followers", str(followers), "--", *worker_argv]


def follower_argv(instance: InstanceSpec, rank: int, link: str, output: str) -> list[str]:
    return [sys.executable, "-m", "hetbatch.launch.span", "follower", "--link", link,
            "--output", output, "--instance", instance.instance_id, "--rank", str(rank)]


def span_processes(
    instance: InstanceSpec,
    ranks: list[int],
    worker_argv: list[str],
    head: tuple[str, int, int],
    output: str,
    log_dir: Path | None = None,
    stand_in: bool = False,
) -> list[WorkerProcess]:
    """The processes of `instance` on the nodes of `ranks`; `head` is (host, vLLM master port,
    link port). With `stand_in`, one machine plays every node: each rank gets the next cores."""
    host, master_port, link_port = head
    processes = []
    for rank in ranks:
        inst = instance
        if stand_in and instance.is_cpu:
            cores = os.cpu_count() or 1
            width = len(instance.devices)
            shifted = tuple((d + rank * width) % cores for d in instance.devices)
            inst = replace(instance, devices=shifted)
        log = log_dir / f"{instance.instance_id}.rank{rank}.log" if log_dir and rank else None
        if log_dir and not rank:
            log = log_dir / f"{instance.instance_id}.log"
        argv = (
            head_argv(worker_argv, link_port, instance.nodes - 1)
            if rank == 0
            else follower_argv(instance, rank, f"{host}:{link_port}", output)
        )
        processes.append(WorkerProcess(inst, log, argv=argv, env=span_env(rank, host, master_port)))
    return processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _start(argv: list[str]) -> subprocess.Popen:
    """A child in a process group of its own, so that stopping it stops what it started too
    (vLLM's worker processes do not follow their parent out)."""
    return subprocess.Popen(argv, preexec_fn=die_with_parent, start_new_session=True)


def _stop(child: subprocess.Popen) -> None:
    """Ask the child to stop (it stops what it started), give it 10 s, then kill its whole
    process group: what it left behind goes with it."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(child.pid, signal.SIGKILL)  # a group outlives its leader: sweep the rest


def _say(line: str) -> None:
    print(f"hetbatch span: {line}", file=sys.stderr, flush=True)


def run_head(link_port: int, followers: int, worker_argv: list[str]) -> int:
    """Run the worker; stop it and fail if a follower that joined goes away."""
    server = socket.create_server(("", link_port), reuse_port=False)
    server.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    child = _start(worker_argv)
    signal.signal(signal.SIGTERM, lambda *_: (_stop(child), sys.exit(143)))
    joined = 0
    try:
        while child.poll() is None:
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is server:
                    conn, _addr = server.accept()
                    sel.register(conn, selectors.EVENT_READ)
                    joined += 1
                elif not key.fileobj.recv(1):  # type: ignore[union-attr]
                    _say(f"a follower left ({joined} of {followers} had joined); stopping")
                    _stop(child)
                    return FOLLOWER_LOST
        return child.returncode
    finally:
        _stop(child)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def _connect(link: str, wait_s: float) -> socket.socket:
    host, _, port = link.rpartition(":")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_follower(link: str, output: str, instance_id: str, rank: int, wait_s: float) -> int:
    """Join the head's link, then serve this node's share of the engine until the head goes."""
    conn = _connect(link, wait_s)
    # A killed follower takes its share of the engine along (the child dies with its parent).
    child = _start([sys.executable, "-m", "hetbatch.launch.span", "engine", "--output", output,
                    "--instance", instance_id, "--rank", str(rank)])
    signal.signal(signal.SIGTERM, lambda *_: (_stop(child), sys.exit(143)))
    conn.settimeout(0.2)
    try:
        while child.poll() is None:
            try:
                if not conn.recv(1):
                    break  # the head went away
            except TimeoutError:
                continue
        else:
            _say(f"rank {rank} of {instance_id}: engine exited ({child.returncode})")
            return child.returncode or 1
    finally:
        _stop(child)
        conn.close()
    from hetbatch.coordinator.ledger import OutputStore

    return 0 if OutputStore(output).is_complete() else HEAD_LOST


def run_engine_share(output: str, instance_id: str, rank: int) -> int:
    """This node's share of the instance's engine: vLLM's headless executor, or idle for `sim`."""
    from hetbatch.coordinator.ledger import OutputStore
    from hetbatch.engines.factory import prepare_environment
    from hetbatch.io.paths import OutputPaths
    from hetbatch.spec import parse_job

    store = OutputStore(output)
    job = parse_job(store.read_json(OutputPaths.JOB)["spec"], f"{output} job.json")
    layout = store.read_json(OutputPaths.LAYOUT)
    instance = next(i for i in layout if i["instance_id"] == instance_id)
    if job.engine.kind == "sim":
        while True:
            time.sleep(3600)
    os.environ[RANK_ENV] = str(rank)
    prepare_environment(job, instance["accelerator"])
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from hetbatch.engines.factory import vllm_args

    args = vllm_args(job, instance)
    config = EngineArgs(model=job.model.path, **args).create_engine_config(
        usage_context=UsageContext.LLM_CLASS, headless=True
    )
    executor = MultiprocExecutor(config, monitor_workers=False)
    # Stopped by the follower: shut vLLM's worker processes down with their shared memory.
    signal.signal(signal.SIGTERM, lambda *_: (executor.shutdown(), sys.exit(143)))
    executor.start_worker_monitor(inline=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    head = sub.add_parser("head")
    head.add_argument("--link-port", type=int, required=True)
    head.add_argument("--followers", type=int, required=True)
    head.add_argument("worker", nargs=argparse.REMAINDER)
    for name in ("follower", "engine"):
        p = sub.add_parser(name)
        p.add_argument("--output", required=True)
        p.add_argument("--instance", required=True)
        p.add_argument("--rank", type=int, required=True)
        if name == "follower":
            p.add_argument("--link", required=True)
            p.add_argument("--wait-s", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.role == "head":
        worker = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
        return run_head(args.link_port, args.followers, worker)
    if args.role == "follower":
        return run_follower(args.link, args.output, args.instance, args.rank, args.wait_s)
    return run_engine_share(args.output, args.instance, args.rank)


if __name__ == "__main__":
    sys.exit(main())
