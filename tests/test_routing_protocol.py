"""Rows dealt by the context they need: the wire, the coordinator, shard names, the ledger and
what a resumed job deals again."""

from __future__ import annotations

import pyarrow as pa
import pytest

from hetbatch.coordinator import messages as m
from hetbatch.coordinator.bands import resume_state
from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.coordinator.protocol import Client, RejectedByCoordinator
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.parquet import parse_shard, parse_shard_name, shard_name, write_table
from hetbatch.io.paths import OutputPaths
from hetbatch.scheduler.core import Scheduler, SchedulerConfig
from hetbatch.scheduler.routing import UNLIMITED, Span
from tests.coordinatorutil import stage


def _client(coord: Coordinator) -> Client:
    host, port = coord.address
    return Client(host, port, "s3cret", retry_s=2)



def _commit(client: Client, instance: str, lease: dict, name: str, **band) -> str:
    return client.call(
        "commit", instance=instance, lease=lease["id"], start=lease["start"], end=lease["end"],
        staging=name, stats={"rows": 3}, **band,
    )["status"]


def test_shard_names_carry_the_band_of_needs() -> None:
    assert shard_name(0, 250) == "part-000000000000-000000000250.parquet"
    banded = shard_name(0, 250, ".jsonl", 4096, None)
    assert banded == "part-000000000000-000000000250.need-4096-max.jsonl"
    assert parse_shard(banded) == (0, 250, 4096, None)
    assert parse_shard(shard_name(5, 9, ".parquet", 0, 512)) == (5, 9, 0, 512)
    assert parse_shard("errors/" + shard_name(1, 2)) == (1, 2, 0, None)
    assert parse_shard_name(banded) == (0, 250)
    assert parse_shard("part-1-2.need-x-max.parquet") is None
    assert parse_shard("notes.txt") is None
    assert OutputPaths.errors_shard(0, 2, (8, 16)) == "errors/" + shard_name(0, 2, ".jsonl", 8, 16)


def test_messages_carry_context_and_bands() -> None:
    hello = m.request("hello", instance="a", context=512)
    assert hello.context == 512
    back = m.request("handback", instance="a", lease=3, at=512)
    assert (back.lease, back.at) == (3, 512)
    commit = m.request("commit", instance="a", lease=3, start=0, end=5, staging="s.parquet",
                       above=64, top=512)
    assert commit.band == (64, 512)
    plain = m.request("commit", instance="a", lease=3, start=0, end=5, staging="s.parquet")
    assert plain.band == (0, None) and "above" not in plain.to_wire("t")
    assert m.lease_reply(1, 0, 5) == {"lease": {"id": 1, "start": 0, "end": 5}}
    assert m.lease_reply(1, 0, 5, above=64, final=True)["lease"] == {
        "id": 1, "start": 0, "end": 5, "above": 64, "final": True
    }
    with pytest.raises(m.MessageError, match="at"):
        m.request("handback", instance="a", lease=3, at=0)


def test_handed_back_rows_are_dealt_to_a_larger_context_and_published_apart(served) -> None:
    coord, _, store = served
    small, big = _client(coord), _client(coord)
    small.call("hello", instance="small", weight=1, context=64)
    big.call("hello", instance="big", weight=1, context=512)
    lease = small.call("lease", instance="small")["lease"]
    with pytest.raises(RejectedByCoordinator, match="give 64"):
        small.call("handback", instance="small", lease=lease["id"], at=128)
    assert small.call("handback", instance="small", lease=lease["id"], at=64) == {"ok": True}
    span = big.call("lease", instance="big")["lease"]  # the long rows first
    assert (span["start"], span["end"], span["above"]) == (lease["start"], lease["end"], 64)
    assert "below" not in span and not span.get("final")
    stage(store, "whole.parquet", 3)
    assert _commit(small, "small", lease, "whole.parquet") == "stale"  # not the rows it holds
    stage(store, "short.parquet", 3)
    assert _commit(small, "small", lease, "short.parquet", top=64) == "accepted"
    stage(store, "long.parquet", 3)
    assert _commit(big, "big", span, "long.parquet", above=64) == "accepted"
    start, end = lease["start"], lease["end"]
    assert store.published_shards() == [(start, end, 0, 64), (start, end, 64, None)]
    assert [r.band for r in store.read_ledger()] == [(0, 64), (64, None)]
    assert coord.metrics["small"].rows == 3  # the rows it kept, not its range


def test_long_rows_no_live_engine_holds_are_dealt_last_as_final(served) -> None:
    coord, _, _ = served
    small = _client(coord)
    small.call("hello", instance="small", weight=1, context=64)
    lease = small.call("lease", instance="small")["lease"]
    small.call("handback", instance="small", lease=lease["id"], at=64)
    coord.scheduler.pending.remove(0, 1000)  # the rest of the job is done
    span = small.call("lease", instance="small")["lease"]
    assert span["above"] == 64 and span["final"] is True


def test_ledger_keeps_each_band_of_a_range(tmp_path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    store.recover()
    plain, low, high = (CommitRecord(0, 10, "a"), CommitRecord(10, 20, "a", top=64),
                        CommitRecord(10, 20, "b", above=64))
    assert "above" not in plain.to_json() and '"top":64' in low.to_json()
    store.append_many([plain, low, high, low])
    assert [r.key for r in store.read_ledger()] == [(0, 10, 0, None), (10, 20, 0, 64),
                                                     (10, 20, 64, None)]


def test_recovery_adopts_a_published_banded_shard(tmp_path) -> None:
    store = OutputStore(str(tmp_path / "out"))
    store.recover()
    store.append(CommitRecord(0, 10, "a", top=64))
    name = shard_name(0, 10, ".parquet", 64, None)
    write_table(store.url_of(name), pa.table({"x": [1]}), "zstd")  # published, no ledger line
    records = OutputStore(str(tmp_path / "out")).recover()
    assert [r.key for r in records] == [(0, 10, 0, 64), (0, 10, 64, None)]


def test_resume_deals_again_what_the_bands_leave() -> None:
    committed, spans = resume_state([
        (0, 100, 0, None),  # whole
        (100, 200, 0, 64),  # handed back, long rows not yet run
        (200, 300, 0, 64), (200, 300, 64, None),  # handed back, long rows done
        (300, 400, 64, 512),  # a span done, the unit that handed it back not (lapsed)
        (300, 350, 0, 64),
    ])
    assert committed == [(0, 400)]
    assert spans == [
        Span(100, 200, 64, UNLIMITED),
        Span(300, 350, 512, UNLIMITED),
        Span(350, 400, 0, 64),
        Span(350, 400, 512, UNLIMITED),
    ]
    assert resume_state([(0, 5, 0, None)]) == ([(0, 5)], [])


def test_a_resumed_scheduler_deals_the_spans_to_a_context_that_holds_them() -> None:
    committed, spans = resume_state([(0, 100, 0, 64)])
    sched = Scheduler(100, SchedulerConfig(), committed=committed)
    for s in spans:
        sched.long_rows.add(s.start, s.end, s.above, s.below)
    assert not sched.done
    sched.join("small", 1.0, 0.0, 8, 64)
    sched.join("big", 1.0, 0.0, 8, 512)
    lease = sched.request("big", 0.0)
    assert (lease.start, lease.end, lease.above) == (0, 100, 64)
    assert sched.commit("big", lease.lease_id, 0, 100, 1.0).value == "accepted"
    assert sched.done
