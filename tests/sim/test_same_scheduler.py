"""The simulator and the live coordinator drive one Scheduler class through the same calls.

The simulator runs a small scenario and records every scheduler call with its time; the same
calls are then made over real TCP to a live Coordinator on a fake clock, whose fresh Scheduler
must hand out exactly the same leases, releases and commit verdicts.
"""

from __future__ import annotations

import pyarrow as pa

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.protocol import Client
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.parquet import write_table
from hetbatch.scheduler.core import Lease, Scheduler, SchedulerConfig, Wait
from hetbatch.sim import SimConfig, SimInstance, Simulation
from tests.sim.helpers import workload

CONFIG = SchedulerConfig(min_unit_rows=8, max_unit_rows=128, lease_timeout_s=1e6)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _scenario() -> tuple[Scheduler, list]:
    insts = [
        SimInstance("a", 300.0, 300.0, 16),
        SimInstance("b", 100.0, 100.0, 16),
        SimInstance("c", 200.0, 60.0, 16, lost_at=15.0),
        SimInstance("d", 200.0, 20.0, 16),  # planned fast, really slow: others steal from it
    ]
    sched = Scheduler(1500, CONFIG)
    trace: list = []
    Simulation(sched, insts, workload(rows=1500), SimConfig(), trace=trace).run()
    assert sched.done
    return sched, trace


def _expected(name: str, result) -> object:
    if name == "request":
        if isinstance(result, Lease):
            return {"lease": {"id": result.lease_id, "start": result.start, "end": result.end}}
        return "done" if result is Wait.DONE else {"wait": result.seconds}
    if name == "heartbeat":
        return ([[r.lease_id, r.cut] for r in result.releases], result.revoked)
    if name == "commit":
        return result.value
    return None


def _replay(coord: Coordinator, clock: FakeClock, store: OutputStore, trace: list) -> list:
    host, port = coord.address
    clients: dict[str, Client] = {}
    seen = []
    for name, args, _ in trace:
        if name == "expire":
            continue  # the coordinator expires on its own tick; nothing lapses here
        inst, now = args[0], args[-1]
        clock.t = now
        c = clients.setdefault(inst, Client(host, port, "tok", retry_s=2))
        if name == "join":
            c.call("hello", instance=inst, weight=args[1], concurrency=args[3])
            seen.append(None)
        elif name == "request":
            reply = c.call("lease", instance=inst)
            seen.append("done" if reply.get("done") else reply)
        elif name == "heartbeat":
            progress = {str(k): list(v) for k, v in args[1].items()}
            reply = c.call("heartbeat", instance=inst, progress=progress)
            seen.append((reply["releases"], reply["revoked"]))
        elif name == "release":
            c.call("release", instance=inst, lease=args[1], cut=args[2])
            seen.append(None)
        elif name == "commit":
            lease, start, end = args[1:4]
            staging = f"{inst}-{lease}-{start}-{end}.parquet"
            rows = pa.table({"x": list(range(start, end))})
            write_table(store.staging_url(staging), rows, "zstd")
            reply = c.call(
                "commit", instance=inst, lease=lease, start=start, end=end, staging=staging
            )
            seen.append(reply["status"])
        elif name == "leave":
            c.call("bye", instance=inst)
            seen.append(None)
    for c in clients.values():
        c.close()
    return seen


def test_coordinator_and_simulator_make_the_same_assignments(tmp_path) -> None:
    sim_sched, trace = _scenario()
    names = {name for name, _, _ in trace}
    assert {"join", "request", "heartbeat", "release", "commit", "leave"} <= names
    clock = FakeClock()
    store = OutputStore(str(tmp_path / "out"))
    store.recover()
    live = Scheduler(1500, CONFIG)
    coord = Coordinator(live, store, {"spec": {}}, token="tok", clock=clock)
    assert type(coord.scheduler) is type(sim_sched)
    coord.start()
    try:
        seen = _replay(coord, clock, store, trace)
    finally:
        coord.stop()
    wanted = [_expected(n, r) for n, _, r in trace if n != "expire"]
    assert seen == wanted
    assert live.done and list(live.committed) == list(sim_sched.committed) == [(0, 1500)]
    assert coord.finished.is_set()
