"""A coordinator served on loopback TCP for protocol tests: a clock the test moves, a real
output store, and staged shards to commit."""

from __future__ import annotations

import pyarrow as pa
import pytest

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.parquet import write_table
from hetbatch.scheduler.core import Scheduler, SchedulerConfig


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def served(tmp_path):
    """A coordinator over 1,000 rows in units of at most 100: (coordinator, clock, store)."""
    clock = FakeClock()
    store = OutputStore(str(tmp_path / "out"))
    store.recover()
    sched = Scheduler(1000, SchedulerConfig(max_unit_rows=100, lease_timeout_s=10))
    coord = Coordinator(sched, store, {"spec": {}}, token="s3cret", clock=clock)
    coord.start()
    yield coord, clock, store
    coord.stop()


def stage(store: OutputStore, name: str, rows: int) -> None:
    """A shard of `rows` rows staged under `name`, ready to commit."""
    write_table(store.staging_url(name), pa.table({"x": list(range(rows))}), "zstd")
