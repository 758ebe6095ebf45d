"""The coordinator over real TCP: authentication, bounded messages, exactly-once publishing."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time

import pytest

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.protocol import (
    MAX_MESSAGE_BYTES,
    Client,
    RejectedByCoordinator,
    recv_message,
    send_message,
)
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.paths import OutputPaths
from hetbatch.scheduler.core import Scheduler, SchedulerConfig
from tests.coordinatorutil import stage


def _client(coord: Coordinator, token: str = "s3cret") -> Client:
    host, port = coord.address
    return Client(host, port, token, retry_s=2)



def test_request_without_token_is_refused(served) -> None:
    coord, _, _ = served
    host, port = coord.address
    with socket.create_connection((host, port)) as sock:
        send_message(sock, {"op": "job"})
        assert recv_message(sock)["error"].startswith("unauthorized")
        assert sock.recv(1) == b""  # and the connection is closed
    with pytest.raises(RejectedByCoordinator, match="unauthorized"):
        _client(coord, token="wrong").call("job")
    assert _client(coord).call("job") == {"job": {"spec": {}}}


def test_oversized_message_is_refused_and_the_connection_closed(served) -> None:
    coord, _, _ = served
    with socket.create_connection(coord.address) as sock:
        sock.sendall(struct.pack(">I", MAX_MESSAGE_BYTES + 1))
        assert "exceeds" in recv_message(sock)["error"]
        assert sock.recv(1) == b""


def test_stale_commit_is_not_published(served) -> None:
    coord, clock, store = served
    a, b = _client(coord), _client(coord)
    a.call("hello", instance="a", weight=1)
    b.call("hello", instance="b", weight=1)
    lease = a.call("lease", instance="a")["lease"]
    clock.t = 11  # a goes silent past its lease timeout
    coord.scheduler.expire(clock.t)
    again = b.call("lease", instance="b")["lease"]
    assert (again["start"], again["end"]) == (lease["start"], lease["end"])
    rows = lease["end"] - lease["start"]
    stage(store, "b.parquet", rows)
    assert (
        b.call(
            "commit",
            instance="b",
            lease=again["id"],
            start=again["start"],
            end=again["end"],
            staging="b.parquet",
        )["status"]
        == "accepted"
    )
    stage(store, "a.parquet", rows)
    assert (
        a.call(
            "commit",
            instance="a",
            lease=lease["id"],
            start=lease["start"],
            end=lease["end"],
            staging="a.parquet",
        )["status"]
        == "duplicate"
    )
    assert store.published_ranges() == [(lease["start"], lease["end"])]
    assert not (store.fs.exists(store.staging_url("a.parquet").split("://")[-1]))
    assert len(store.read_ledger()) == 1


def test_dropped_connection_requeues_leases(served) -> None:
    coord, _, _ = served
    a = _client(coord)
    a.call("hello", instance="a", weight=1)
    lease = a.call("lease", instance="a")["lease"]
    a.close()
    from tests.jobutil import wait_for

    wait_for(
        lambda: coord.scheduler.pending.contains(lease["start"], lease["end"]),
        5,
        "lease back in the queue",
    )


def test_concurrent_commits_are_published_once_and_success_comes_last(tmp_path) -> None:
    """Many workers commit at once (the committer batches them): every row is published and
    recorded exactly once, and `_SUCCESS` appears only after the last ledger line."""
    store = OutputStore(str(tmp_path / "out"))
    store.recover()
    sched = Scheduler(3000, SchedulerConfig(min_unit_rows=10, max_unit_rows=40))
    coord = Coordinator(sched, store, {"spec": {}}, token="s3cret")
    coord.start()

    def work(name: str) -> None:
        client = _client(coord)
        client.call("hello", instance=name, weight=1)
        while not (reply := client.call("lease", instance=name)).get("done"):
            if "lease" not in reply:
                time.sleep(0.02)
                continue
            lease = reply["lease"]
            staging = f"{name}-{lease['id']}.parquet"
            stage(store, staging, lease["end"] - lease["start"])
            client.call("commit", instance=name, lease=lease["id"], start=lease["start"],
                        end=lease["end"], staging=staging)
        client.close()

    try:
        threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert coord.finished.wait(10)
    finally:
        coord.stop()
    ranges = sorted((r.start, r.end) for r in store.read_ledger())
    assert ranges == store.published_ranges()
    assert sum(b - a for a, b in ranges) == 3000 and ranges[0][0] == 0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    ledger = os.stat(store.path("_hetbatch", "ledger.jsonl")).st_mtime_ns
    assert os.stat(store.path("_SUCCESS")).st_mtime_ns >= ledger
    assert store.read_json(OutputPaths.METRICS)["rows_this_run"] == 3000
