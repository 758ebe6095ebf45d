"""The coordinator job of a submitted job: serve the stored job to the workers until every row
is committed, then write _SUCCESS, let the workers hear that they are done, and withdraw worker
jobs still waiting in the queue. Run again on the same output, it resumes from the ledger.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from hetbatch.coordinator.ledger import META_DIR, OutputStore
from hetbatch.coordinator.server import Coordinator
from hetbatch.errors import UserError
from hetbatch.launch.base import Launcher
from hetbatch.launch.slurm import commands
from hetbatch.launch.slurm.submit import cancel_pending
from hetbatch.layout import InstanceSpec
from hetbatch.report import summary_lines
from hetbatch.spec import parse_job
from hetbatch.worker.main import TOKEN_FILE

if TYPE_CHECKING:
    from hetbatch.planner.types import ClusterPlan

PROGRESS_EVERY_S = 30.0
LINGER_S = 15.0


class StoredJobLauncher(Launcher):
    """A launcher over what `submit` stored: the resolved job, its layout and its token."""

    def __init__(self, output: str) -> None:
        store = OutputStore(output)
        if not store.exists():
            raise UserError(f"{output}: no submitted hetbatch job here")
        super().__init__(parse_job(store.read_json("job.json")["spec"], f"{output} job.json"))
        self._layout = [
            InstanceSpec(**{**i, "devices": tuple(i["devices"])})
            for i in store.read_json("layout.json")
        ]
        with store.fs.open(store.path(META_DIR, TOKEN_FILE), "r") as fh:
            self.token = fh.read().strip()

    def _instances(self) -> tuple[list[InstanceSpec], ClusterPlan | None]:
        return self._layout, None  # the layout the workers were submitted for, not a new plan


def coordinate(output: str) -> int:
    launcher = StoredJobLauncher(output)
    run = launcher.prepare()
    if run.already_complete:
        print(f"already complete: {run.total_rows:,} rows in {output}")
        _withdraw_waiting(run.store)
        return 0
    coordinator = launcher.start_coordinator(run)
    host, port = coordinator.address
    print(
        f"coordinator on {host}:{port}: {run.total_rows:,} rows, {run.committed_rows:,} done",
        flush=True,
    )
    started = time.monotonic()
    try:
        while not coordinator.finished.wait(PROGRESS_EVERY_S):
            p = coordinator.progress()
            print(f"{p.rows_done:,} of {p.total_rows:,} rows committed", flush=True)
        _linger(coordinator)
    finally:
        coordinator.stop()
    if coordinator.failure is not None:
        print(f"job failed: {coordinator.failure}", flush=True)
        _withdraw_waiting(run.store)
        return 1
    for line in summary_lines(run.store, coordinator.metrics_dict(), time.monotonic() - started):
        print(line)
    _withdraw_waiting(run.store)
    return 0


def _linger(coordinator: Coordinator) -> None:
    """Stay a moment after the last commit so connected workers learn they are done."""
    deadline = time.monotonic() + LINGER_S
    while time.monotonic() < deadline:
        with coordinator.lock:
            if not any(m.connected for m in coordinator.metrics.values()):
                return
        time.sleep(0.1)


def _withdraw_waiting(store: OutputStore) -> None:
    # Outside Slurm (a coordinator run by hand) there is nothing to withdraw.
    with contextlib.suppress(commands.SlurmUnavailable):
        cancel_pending(store)
