"""The coordinator job of a submitted job: serve the stored job to the workers until every row
is committed, then write _SUCCESS, let the workers hear that they are done, and withdraw worker
jobs still waiting in the queue. Run again on the same output, it resumes from the ledger.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.server import Coordinator
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths
from hetbatch.launch.base import Launcher, PreparedRun, read_layout
from hetbatch.launch.slurm import commands
from hetbatch.launch.slurm.submit import cancel_pending
from hetbatch.layout import InstanceSpec
from hetbatch.spec import parse_job

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
        super().__init__(parse_job(store.read_json(OutputPaths.JOB)["spec"], f"{output} job.json"))
        self._layout = read_layout(store)
        self.token = store.paths.files.read_text(OutputPaths.TOKEN).strip()

    def layout(self) -> tuple[list[InstanceSpec], ClusterPlan | None]:
        return self._layout, None  # the layout the workers were submitted for, not a new plan

    def launch(self, run: PreparedRun) -> int:
        """Serve until every row is committed; the workers run in their own Slurm jobs."""
        coordinator = self.start_coordinator(run)
        host, port = coordinator.address
        print(
            f"coordinator on {host}:{port}: {run.total_rows:,} rows, "
            f"{run.committed_rows:,} done",
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
        self.print_summary(run, coordinator, started)
        _withdraw_waiting(run.store)
        return 0

    def on_complete(self, run: PreparedRun) -> int:
        code = super().on_complete(run)
        _withdraw_waiting(run.store)
        return code


def coordinate(output: str) -> int:
    return StoredJobLauncher(output).execute()


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
