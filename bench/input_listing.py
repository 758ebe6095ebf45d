"""From `hetbatch run` to the first lease, with an input of 1,000 and 10,000 Parquet files on S3.

Runs against a real S3-compatible server on loopback (moto's standalone server, started here as
its own process). For each dataset size it uploads that many small Parquet files, then times in
this process what `hetbatch run` does before a worker can work: validate the job, list the
input once, read every footer (in parallel), write the job's records to the S3 output, start
the coordinator, and answer a worker's hello and first lease over TCP (Python's start-up and
the engine's, which do not depend on the input, are left out).

Side by side, the old way of reading the input's metadata: one listing, then per file an
existence check, an open and a footer read, one file after the other. Both make the same
requests (one listing page per 1,000 files, one ranged GET per file); the new one has them in
flight together. Against moto on loopback each request costs the server's CPU and nothing of a
network, so `--latency-ms` puts a proxy in front of it that holds each request back that long,
as a real object store's time to first byte does (S3: tens of milliseconds).

    python bench/input_listing.py [--files 1000 10000] [--rows-per-file 100] [--latency-ms 0 20]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetbatch.coordinator.protocol import Client
from hetbatch.io import parquet
from hetbatch.io.fs import filesystem
from hetbatch.launch.base import Launcher
from hetbatch.spec import parse_job
from tests.s3server import start_server


def start_latency_proxy(target_port: int, latency_s: float) -> int:
    """A loopback TCP proxy that delays every chunk a client sends by `latency_s` (each chunk
    is one HTTP request here), in a thread of its own; returns its port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def pipe(reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(client_r, server_w, latency_s), pipe(server_r, client_w, 0))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        await server.serve_forever()

    ready = threading.Event()
    threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
    ready.wait()
    return port


def upload(server, bucket: str, files: int, rows: int) -> str:
    """`files` Parquet objects of `rows` rows each (two row groups), uploaded concurrently."""
    fs = server.filesystem()
    blobs = {}
    for i in range(files):
        ids = [f"r{i * rows + k:09d}" for k in range(rows)]
        table = pa.table({"id": ids, "prompt": [f"prompt number {k}" for k in ids]})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=max(1, rows // 2))
        blobs[f"{bucket}/in/part-{i:06d}.parquet"] = buffer.getvalue()
    for chunk in range(0, files, 2000):
        fs.pipe(dict(list(blobs.items())[chunk : chunk + 2000]))
    return f"s3://{bucket}/in/"


def old_footers(url: str, options: dict) -> int:
    """The old reading of the input's metadata: per file, an existence check, an open (a
    HEAD), a footer read and a size, sequentially."""
    fs, path = filesystem(url, options)
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    rows = 0
    for p in files:
        assert fs.isfile(p)
        with fs.open(p, "rb") as fh:
            rows += pq.ParquetFile(fh).metadata.num_rows
        fs.size(p)
    return rows


def job_for(url: str, out: str, options: dict) -> dict:
    return {
        "model": {"path": "simulated"},
        "input": {"path": url, "prompt_column": "prompt", "id_column": "id",
                  "storage_options": options},
        "output": {"path": out, "storage_options": options},
        "engine": {"kind": "sim"},
        "cluster": {"pools": [{"name": "sim", "accelerator": "cpu", "devices_per_node": 1,
                               "sim": {"tokens_per_s": 1000}}]},
    }


def to_first_lease(url: str, out: str, options: dict) -> tuple[float, float, int]:
    """Seconds from the launcher's start to a worker's first lease, and of that the input's
    metadata (listing and footers; `prepare` then finds it read, as `run` does after planning)."""
    parquet._OPENED.clear()
    filesystem(url, options)[0].invalidate_cache()
    t0 = time.perf_counter()
    launcher = Launcher(parse_job(job_for(url, out, options)))
    parquet.open_dataset(url, ["prompt"], options)
    t_units = time.perf_counter() - t0
    run = launcher.prepare()
    coordinator = launcher.start_coordinator(run)
    try:
        host, port = coordinator.address
        client = Client(host, port, launcher.token)
        client.call("hello", instance="sim-0-0", weight=1.0, pool="sim")
        lease = client.call("lease", instance="sim-0-0")
        assert "lease" in lease, lease
        t_lease = time.perf_counter() - t0
        client.close()
    finally:
        coordinator.stop()
    return t_lease, t_units, run.dataset.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--rows-per-file", type=int, default=100)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    args = ap.parse_args()
    proc, server = start_server()
    port = int(server.endpoint.rsplit(":", 1)[1])
    proxies = {ms: start_latency_proxy(port, ms / 1e3) for ms in args.latency_ms if ms}
    try:
        print(f"S3 server {server.endpoint} (moto, loopback); {args.rows_per_file} rows per file")
        print(f"{'files':>7} {'latency':>8} {'first lease':>12} {'of it footers':>14} "
              f"{'old footers':>12} {'old/new footers':>16}")
        for files in args.files:
            bucket = f"b-{uuid.uuid4().hex[:10]}"
            server.filesystem().mkdir(bucket)
            url = upload(server, bucket, files, args.rows_per_file)
            for ms in args.latency_ms:
                endpoint = f"http://127.0.0.1:{proxies[ms]}" if ms else server.endpoint
                options = {**server.storage_options, "endpoint_url": endpoint}
                lease_s, new_s, rows = to_first_lease(url, f"s3://{bucket}/out-{ms:g}", options)
                assert rows == files * args.rows_per_file
                t = time.perf_counter()
                assert old_footers(url, options) == rows
                old_s = time.perf_counter() - t
                print(f"{files:>7,} {ms:>6g}ms {lease_s:>11.2f}s {new_s:>13.2f}s "
                      f"{old_s:>11.2f}s {old_s / new_s:>15.1f}x", flush=True)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
