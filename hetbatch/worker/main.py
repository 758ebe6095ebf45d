"""Worker process entry point: join the coordinator, start the engine, work until done.

The worker needs only the coordinator's address (or the `coordinator.json` the coordinator
writes, which follows a coordinator that restarts elsewhere), the job token (from the
environment or the job's `_hetbatch/token` file, never on the command line where `ps` shows it)
and its instance id: the job itself comes from the coordinator, so a worker on another host
needs no copy of the job file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import click

from hetbatch.coordinator.protocol import (
    Client,
    CoordinatorRestarted,
    CoordinatorUnavailable,
    JobComplete,
    Locator,
    file_locator,
)
from hetbatch.engines.base import Engine
from hetbatch.engines.factory import build_engine, preload_engine, prepare_environment
from hetbatch.io.parquet import InputDataset, dataset_from_dict
from hetbatch.io.paths import OutputPaths
from hetbatch.io.prefix_order import PrefixOrder
from hetbatch.spec import JobSpec, parse_job
from hetbatch.worker.loop import RELAYOUT_EXIT, Worker
from hetbatch.worker.output import output_schema

TOKEN_ENV = "HETBATCH_TOKEN"
STOPPED_EXIT = 128 + signal.SIGTERM  # the exit code of a worker that left on SIGTERM


class Stopped(Exception):
    """The worker was told to stop (SIGTERM) and gave its leases back."""


class Relayout(Exception):
    """The worker's pool was re-planned: it finished its units and leaves to be restarted."""

log = logging.getLogger("hetbatch.worker")


def run_worker(
    host: str,
    port: int,
    token: str,
    instance_id: str,
    locate: Locator | None = None,
    wait_s: float = 30.0,
) -> None:
    preload_engine()  # overlaps the wait for the coordinator
    client = Client(host, port, token, retry_s=wait_s, locate=locate)
    job_data = client.call("job")["job"]
    instance = job_data["instances"][instance_id]
    hello = {"instance": instance_id, "weight": instance["weight"], "pool": instance["pool"]}
    job = parse_job(job_data["spec"], "job from coordinator")
    if locate is not None:
        client.retry_s = max(client.retry_s, job.slurm.reconnect_s)
    dataset = dataset_from_dict(job_data["dataset"])
    window = job_data.get("prefix_window_rows")
    prefix_order = None if window is None else PrefixOrder(window, dataset.num_rows)
    prepare_environment(job, instance["accelerator"], instance.get("own_process"))
    engine_cpus, helper_cpus = cpu_split(job_data["instances"], instance)
    own_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1"
    started = time.monotonic()
    if own_process and engine_cpus:
        # vLLM's engine core (its scheduler) and everything of this process (vLLM's front
        # end, the reader, writer and coordinator threads) run on the cores no engine runs
        # on: they inherit them from this thread. vLLM's model runner binds itself to the
        # engine's cores, and has them to itself.
        _pin_process(helper_cpus)
    engine = _start_engine(job, instance)
    if job.engine.kind == "vllm":
        where = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1"
        log.info("engine ready in %.1f s: up to %d sequences at once (engine core in %s "
                 "process)", time.monotonic() - started, engine.max_concurrency,
                 "its own" if where else "this")
    stop = _stop_on_sigterm()
    try:
        # Join only once the engine is up, so that no lease waits on a loading model.
        while (ending := _work(
            client, hello, job, dataset, engine, stop, prefix_order, helper_cpus
        )) == "restarted":
            log.warning("coordinator restarted: in-flight units dropped, joining the new one")
        if ending == "stopped":
            raise Stopped()  # it said bye already
        client.call("bye", instance=instance_id)
        if ending == "relayout":
            raise Relayout()
    finally:
        engine.close()
        client.close()


def cpu_split(
    instances: dict[str, dict[str, Any]], instance: dict[str, Any]
) -> tuple[set[int], set[int]]:
    """The cores of this CPU instance's engine, and those its worker's own work runs on: the
    cores of the process that no engine on the node runs on, or all of them when engines
    fill the node (no cores are told apart off the CPU, or when the layout names other cores
    than this process has)."""
    cpus = os.sched_getaffinity(0)
    if instance["accelerator"].lower() != "cpu":
        return set(), cpus
    own = set(instance["devices"])
    taken = set().union(*(
        i["devices"] for i in instances.values()
        if i["pool"] == instance["pool"] and i.get("node") == instance.get("node")
        and i["accelerator"].lower() == "cpu"
    ))
    if not own <= cpus:
        return set(), cpus
    return own, (cpus - taken) or cpus


def _pin_process(cpus: set[int]) -> None:
    """Move every thread of this process to `cpus` (Linux sets affinity per thread); what
    they start inherits them."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cpus)


MAX_ENGINE_STARTS = 4


def _start_engine(job: JobSpec, instance: dict[str, Any]) -> Engine:
    """Start the instance's engine; one that does not fit in memory is started again with
    smaller settings (a shorter context, a smaller batch), each change logged, instead of
    failing into a crash loop of restarts with the same settings."""
    from hetbatch.engines.vllm_engine import smaller_settings

    starts = 1
    while True:
        try:
            return build_engine(job, instance)
        except (ValueError, RuntimeError) as exc:  # vLLM's start-up errors; torch's OOM
            change = smaller_settings(exc, instance["engine_args"])
            if job.engine.kind != "vllm" or change is None or starts == MAX_ENGINE_STARTS:
                raise
            starts += 1
            old = {k: instance["engine_args"].get(k) for k in change}
            instance = {**instance, "engine_args": {**instance["engine_args"], **change}}
            log.warning(
                "engine did not fit in memory (%s); starting it again with %s (was %s)",
                str(exc).split(". ")[0][:200],
                ", ".join(f"{k}={v}" for k, v in change.items()),
                ", ".join(f"{k}={v}" for k, v in old.items()),
            )


def _stop_on_sigterm() -> threading.Event:
    """SIGTERM (Slurm preemption, time limit, scancel; the supervisor stopping) sets an event
    the worker loop checks at every turn. Until now the default applies: nothing is held."""
    stop = threading.Event()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop.set()  # no logging here: the main thread may hold the logging lock

    signal.signal(signal.SIGTERM, on_sigterm)
    return stop


def _work(
    client: Client,
    hello: dict[str, Any],
    job: JobSpec,
    dataset: InputDataset,
    engine: Engine,
    stop: threading.Event,
    prefix_order: PrefixOrder | None = None,
    helper_cpus: set[int] | None = None,
) -> str:
    """Work until the job is "done", or the worker is "stopped", or the coordinator
    "restarted" (its leases are then void)."""
    client.on_reconnect = lambda: {"op": "hello", "token": client.token, **hello}
    worker = Worker(
        client,
        hello["instance"],
        job,
        dataset,
        output_schema(job, dataset.schema),
        engine,
        heartbeat_s=job.scheduler.heartbeat_s,
        stop=stop,
        hang_timeout_s=job.engine.hang_timeout_s,
        prefix_order=prefix_order,
        helper_cpus=helper_cpus,
    )
    try:
        hello["concurrency"] = engine.max_concurrency
        if worker.context is not None:  # rows needing more context are dealt elsewhere
            hello["context"] = worker.context
        client.call("hello", **hello)
        if not worker.run():
            return "stopped"
        return "relayout" if worker.restart else "done"
    except CoordinatorRestarted:
        engine.abort(list(worker.in_flight))
        client.acknowledge_restart()
        return "restarted"


def read_token(coordinator_file: str | None) -> str | None:
    """The job token: from the environment, else from the job's token file."""
    token = os.environ.get(TOKEN_ENV)
    if token or coordinator_file is None:
        return token
    output = OutputPaths.of(coordinator_file, OutputPaths.COORDINATOR)
    try:
        return output.files.read_text(OutputPaths.TOKEN).strip() or None
    except OSError:
        return None


@click.command()
@click.option("--coordinator", "address", help="HOST:PORT of the coordinator")
@click.option(
    "--coordinator-file",
    help="the job's _hetbatch/coordinator.json: wait for it, follow a restarted coordinator",
)
@click.option("--instance", "instance_id", required=True, help="this worker's instance id")
@click.option(
    "--wait-s", type=float, default=30.0, help="how long to wait for an unreachable coordinator"
)
def main(
    address: str | None, coordinator_file: str | None, instance_id: str, wait_s: float
) -> None:
    """Run one engine instance's worker."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {instance_id} %(message)s")
    if (address is None) == (coordinator_file is None):
        sys.exit("hetbatch worker: give one of --coordinator and --coordinator-file")
    token = read_token(coordinator_file)
    if not token:
        sys.exit(f"hetbatch worker: {TOKEN_ENV} is not set and no token file was found")
    host, _, port = (address or ":0").rpartition(":")
    locate = file_locator(coordinator_file) if coordinator_file else None
    try:
        run_worker(host, int(port), token, instance_id, locate, wait_s)
    except JobComplete:
        log.info("the job is complete")
    except Stopped:
        sys.exit(STOPPED_EXIT)
    except Relayout:
        log.info("restarting in the re-planned layout")
        sys.exit(RELAYOUT_EXIT)
    except CoordinatorUnavailable as exc:
        sys.exit(f"hetbatch worker {instance_id}: {exc}")
