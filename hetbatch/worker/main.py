"""Worker process entry point: join the coordinator, start the engine, work until done.

The worker needs only the coordinator's address, the job token (from the environment, never on
the command line where `ps` shows it) and its instance id: the job itself comes from the
coordinator, so a worker on another host needs no copy of the job file.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from hetbatch.coordinator.protocol import Client, CoordinatorUnavailable
from hetbatch.engines.factory import build_engine, prepare_environment
from hetbatch.io.parquet import dataset_from_dict
from hetbatch.spec import parse_job
from hetbatch.worker.loop import Worker
from hetbatch.worker.rows import output_schema

TOKEN_ENV = "HETBATCH_TOKEN"


def run_worker(host: str, port: int, token: str, instance_id: str) -> None:
    client = Client(host, port, token)
    job_data = client.call("job")["job"]
    instance = job_data["instances"][instance_id]
    hello = {"instance": instance_id, "weight": instance["weight"], "pool": instance["pool"]}
    job = parse_job(job_data["spec"], "job from coordinator")
    dataset = dataset_from_dict(job_data["dataset"])
    prepare_environment(job, instance["accelerator"])
    engine = build_engine(job, instance)
    try:
        # Join only once the engine is up, so that no lease waits on a loading model.
        client.call("hello", **hello)
        client.on_reconnect = lambda: {"op": "hello", "token": token, **hello}
        worker = Worker(
            client,
            instance_id,
            job,
            dataset,
            output_schema(job, dataset.schema),
            engine,
            heartbeat_s=job.scheduler.heartbeat_s,
        )
        worker.run()
        client.call("bye", instance=instance_id)
    finally:
        engine.close()
        client.close()


@click.command()
@click.option("--coordinator", "address", required=True, help="HOST:PORT of the coordinator")
@click.option("--instance", "instance_id", required=True, help="this worker's instance id")
def main(address: str, instance_id: str) -> None:
    """Run one engine instance's worker."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {instance_id} %(message)s")
    token = os.environ.get(TOKEN_ENV)
    if not token:
        sys.exit(f"hetbatch worker: {TOKEN_ENV} is not set")
    host, _, port = address.rpartition(":")
    try:
        run_worker(host, int(port), token, instance_id)
    except CoordinatorUnavailable as exc:
        sys.exit(f"hetbatch worker {instance_id}: {exc}")
