"""The cost of one commit on S3 with many units already committed, old way against new way.

Runs against a real S3-compatible server on loopback (moto's standalone server, started here as
its own process). Both ways publish a staged shard and record it durably:

  old: the shard staged as an object under `_hetbatch/staging/`, published by `fs.mv` (a copy
       and a delete), and the whole ledger rewritten as one object (O(committed units) bytes);
  new: the shard staged as an uncompleted multipart upload to its final name, published by
       completing it (no bytes copied), and the record written as a small ledger segment
       (`OutputStore.publish` + `append`, the coordinator's own path).

Printed per commit (the coordinator's side: publish and record; the worker's staging write
comes before and is not counted): wall time, S3 requests and bytes sent, at `--units`
committed units (default 100,000) and at 1,000, and the ratio old/new. Commits one after the
other, one ledger write each (the coordinator writes a batch of commits in one).

    python bench/ledger_commit.py [--units 100000] [--commits 20]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.io.parquet import shard_name
from hetbatch.io.shards import stage_shard
from tests.s3server import start_server

SHARD_ROWS = 250


class RequestCounter:
    """Counts S3 requests and the bytes of their bodies, through botocore's own events."""

    def __init__(self, fs) -> None:
        fs.call_s3("list_buckets")  # connects the client
        self.requests = 0
        self.bytes = 0
        fs.s3.meta.events.register("before-call.s3", self._count)

    def _count(self, params, **_) -> None:
        self.requests += 1
        body = params.get("body")
        if isinstance(body, (bytes, bytearray)):
            self.bytes += len(body)
        elif hasattr(body, "seek") and hasattr(body, "tell"):
            pos = body.tell()
            body.seek(0, 2)
            self.bytes += body.tell() - pos
            body.seek(pos)


def shard_table(start: int) -> pa.Table:
    ids = [f"r{i:09d}" for i in range(start, start + SHARD_ROWS)]
    return pa.table({"id": ids, "generated_text": ["some generated words " * 4] * SHARD_ROWS})


def seed_ledger(store: OutputStore, units: int) -> list[CommitRecord]:
    records = [
        CommitRecord(i * SHARD_ROWS, (i + 1) * SHARD_ROWS, f"w{i % 64}", 4000, 2000, 0, 1e9)
        for i in range(units)
    ]
    text = "".join(r.to_json() + "\n" for r in records)
    store.fs.pipe_file(store.path("_hetbatch", "ledger.jsonl"), text.encode())
    return records


def old_stage(store: OutputStore, start: int) -> str:
    """The worker's write before: a whole object under `_hetbatch/staging/`."""
    buffer = io.BytesIO()
    pq.write_table(shard_table(start), buffer, compression="zstd")
    staged = store.path("_hetbatch", "staging", f"w-{start}.parquet")
    store.fs.pipe_file(staged, buffer.getvalue())
    return staged


def old_commit(store: OutputStore, records: list[CommitRecord], start: int, staged: str) -> None:
    """The coordinator's commit before: `fs.mv` the shard, rewrite the whole ledger."""
    store.fs.mv(staged, store.path(shard_name(start, start + SHARD_ROWS)))
    records.append(CommitRecord(start, start + SHARD_ROWS, "w0", 4000, 2000, 0, time.time()))
    text = "".join(r.to_json() + "\n" for r in records)
    store.fs.pipe_file(store.path("_hetbatch", "ledger.jsonl"), text.encode())


def new_stage(url: str, options: dict, start: int) -> str:
    """The worker's write now: an uncompleted multipart upload to the final name."""
    return stage_shard(url, options, f"w-{start}.parquet", start, start + SHARD_ROWS,
                       shard_table(start), "zstd")


def new_commit(store: OutputStore, start: int, handle: str) -> None:
    """The coordinator's commit now: complete the upload, write a ledger segment."""
    store.publish(handle, start, start + SHARD_ROWS)
    store.append(CommitRecord(start, start + SHARD_ROWS, "w0", 4000, 2000, 0, time.time()))


def measure(
    counter: RequestCounter,
    commits: int,
    stage: Callable[[int], str],
    commit: Callable[[int, str], None],
    first: int,
) -> tuple[float, float, float]:
    """Median wall time, requests and bytes of the commit alone (staging is the worker's)."""
    times, requests, sent = [], [], []
    for k in range(commits):
        start = first + k * SHARD_ROWS
        staged = stage(start)
        r0, b0 = counter.requests, counter.bytes
        t0 = time.perf_counter()
        commit(start, staged)
        times.append(time.perf_counter() - t0)
        requests.append(counter.requests - r0)
        sent.append(counter.bytes - b0)
    return statistics.median(times), statistics.median(requests), statistics.median(sent)


def run_at(server, units: int, commits: int) -> dict[str, tuple[float, float, float]]:
    fs = server.filesystem()
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    options = server.storage_options
    first = units * SHARD_ROWS
    out = {}
    # old way
    old_url = f"s3://{bucket}/old"
    old_store = OutputStore(old_url, options)
    records = seed_ledger(old_store, units)
    counter = RequestCounter(old_store.fs)
    out["old"] = measure(counter, commits, lambda s: old_stage(old_store, s),
                         lambda s, h: old_commit(old_store, records, s, h), first)
    # new way: the same committed units, compacted into the base ledger as a resume leaves it
    new_url = f"s3://{bucket}/new"
    new_store = OutputStore(new_url, options)
    seed_ledger(new_store, units)
    new_store.recover()
    counter = RequestCounter(new_store.fs)
    out["new"] = measure(counter, commits, lambda s: new_stage(new_url, options, s),
                         lambda s, h: new_commit(new_store, s, h), first)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=20)
    args = ap.parse_args()
    proc, server = start_server()
    try:
        print(f"S3 server {server.endpoint} (moto, loopback); {SHARD_ROWS}-row shards; "
              f"median of {args.commits} sequential commits")
        print(f"{'committed units':>16}  {'way':<4} {'ms/commit':>10} {'requests':>9} "
              f"{'bytes sent':>12}")
        results = {}
        for units in (1_000, args.units):
            results[units] = run_at(server, units, args.commits)
            for way in ("old", "new"):
                t, r, b = results[units][way]
                print(f"{units:>16,}  {way:<4} {t * 1e3:>10.1f} {r:>9.0f} {b:>12,.0f}")
        big = results[args.units]
        print(f"at {args.units:,} units: old/new time {big['old'][0] / big['new'][0]:.1f}x, "
              f"bytes {big['old'][2] / big['new'][2]:.1f}x; new-way time at {args.units:,} / "
              f"at 1,000 units: {big['new'][0] / results[1_000]['new'][0]:.2f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
