"""Input and output on S3: a real S3-compatible server on loopback (moto's, started by the
`s3_server` fixture), real Parquet, the real coordinator over TCP, whole jobs through the CLI."""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.coordinator.protocol import Client
from hetbatch.coordinator.server import Coordinator
from hetbatch.io.parquet import open_dataset
from hetbatch.io.shards import stage_shard
from hetbatch.scheduler.core import Scheduler, SchedulerConfig
from tests.jobutil import (
    TINY_ENGINE_ARGS,
    input_table,
    make_input,
    run_cli,
    sim_job,
    sim_pool,
    start_cli,
    worker_pids,
    write_job,
)
from tests.s3server import S3Server

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "prompts.parquet"


# -- helpers ------------------------------------------------------------------------------------


def put_table(server: S3Server, path: str, table: pa.Table, row_group_size: int = 500) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    server.filesystem().pipe_file(path, buffer.getvalue())


def put_input(server: S3Server, bucket: str, rows: int, files: int) -> str:
    """`rows` rows of tests.jobutil's input, cut into `files` Parquet objects."""
    table = input_table(rows)
    step = -(-rows // files)
    for i in range(files):
        put_table(server, f"{bucket}/in/part-{i:03d}.parquet", table.slice(i * step, step))
    return f"s3://{bucket}/in/"


def polars_options(server: S3Server) -> dict[str, str]:
    return {
        "aws_endpoint_url": server.endpoint,
        "aws_access_key_id": server.storage_options["key"],
        "aws_secret_access_key": server.storage_options["secret"],
        "aws_region": "us-east-1",
        "aws_allow_http": "true",
    }


def read_with_polars(server: S3Server, url: str) -> pl.DataFrame:
    return pl.read_parquet(f"{url}/*.parquet", storage_options=polars_options(server))


def read_with_pyarrow(server: S3Server, url: str) -> pa.Table:
    fs = pafs.S3FileSystem(
        endpoint_override=server.endpoint,
        scheme="http",
        access_key=server.storage_options["key"],
        secret_key=server.storage_options["secret"],
        region="us-east-1",
    )
    return pq.read_table(url.removeprefix("s3://"), filesystem=fs)


def pending_uploads(server: S3Server, bucket: str) -> list[dict[str, Any]]:
    reply = server.filesystem().call_s3("list_multipart_uploads", Bucket=bucket)
    return list(reply.get("Uploads", []))


def assert_every_row_once(server: S3Server, url: str, rows: int) -> None:
    """Read straight from S3 by polars and by pyarrow, no glue: every input row exactly once."""
    expected = [f"r{i:06d}" for i in range(rows)]
    df = read_with_polars(server, url)
    assert df.height == rows, f"polars: {df.height} rows for {rows}"
    assert sorted(df["id"].to_list()) == expected
    table = read_with_pyarrow(server, url)
    assert table.num_rows == rows, f"pyarrow: {table.num_rows} rows for {rows}"
    assert sorted(table.column("id").to_pylist()) == expected
    ledger = OutputStore(url, server.storage_options).read_ledger()
    spans = sorted((r.start, r.end) for r in ledger)
    assert sum(b - a for a, b in spans) == rows
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def committed(server: S3Server, url: str) -> list[CommitRecord]:
    return OutputStore(url, server.storage_options).read_ledger()


def committed_rows(server: S3Server, url: str) -> int:
    return sum(r.end - r.start for r in committed(server, url))


def wait_for_rows(server: S3Server, url: str, rows: int, timeout: float) -> None:
    """Poll the ledger gently (reading it lists and reads every segment)."""
    deadline = time.monotonic() + timeout
    while committed_rows(server, url) < rows:
        assert time.monotonic() < deadline, f"timed out waiting for {rows} committed rows"
        time.sleep(0.5)


# -- drivers and errors -------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["input", "output"])
def test_missing_driver_is_one_line_naming_the_package(tmp_path, side) -> None:
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 100), [sim_pool("a", 1000)])
    job[side]["path"] = "abfs://container/data"  # adlfs is not installed
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "adlfs" in lines[0] and "abfs://container/data" in lines[0]
    assert not (tmp_path / "out").exists()


def test_unreachable_bucket_is_one_line(tmp_path, s3_server) -> None:
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 100), [sim_pool("a", 1000)])
    options = s3_server.storage_options
    job["output"] = {"path": "s3://no-such-bucket/out", "storage_options": options}
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "s3://no-such-bucket/out" in result.stderr


def test_example_gpu_job_plans_and_dry_runs_from_s3(s3_env: S3Server) -> None:
    """jobs/example-gpu-cluster.yaml as a user copies it, its input in s3://my-bucket."""
    s3_env.new_bucket("my-bucket")
    n = 400
    table = pa.table(
        {
            "request_id": [f"q{i}" for i in range(n)],
            "messages": [
                [{"role": "user", "content": "Summarise this: " + "word " * (5 + i % 90)}]
                for i in range(n)
            ],
            "customer": [f"c{i % 3}" for i in range(n)],
            "language": ["en"] * n,
        }
    )
    put_table(s3_env, "my-bucket/prompts/a.parquet", table.slice(0, n // 2), row_group_size=50)
    put_table(s3_env, "my-bucket/prompts/b.parquet", table.slice(n // 2), row_group_size=50)
    plan = run_cli("plan", "jobs/example-gpu-cluster.yaml", cwd=REPO)
    assert plan.returncode == 0, plan.stderr
    assert all(pool in plan.stdout for pool in ("h100", "a100", "l40s"))
    dry = run_cli("submit", "jobs/example-gpu-cluster.yaml", "--dry-run", cwd=REPO)
    assert dry.returncode == 0, dry.stderr
    assert "hetbatch.launch.slurm.node s3://my-bucket/completions/run-7 --pool h100" in dry.stdout
    assert "#SBATCH --gres=gpu:l40s:4" in dry.stdout
    assert not s3_env.filesystem().exists("my-bucket/completions")  # a dry run writes nothing


# -- the input -----------------------------------------------------------------------------------


def test_input_of_many_files_becomes_units_from_footers(s3_server) -> None:
    bucket = s3_server.new_bucket()
    url = put_input(s3_server, bucket, 3_000, 30)
    dataset = open_dataset(url, ["prompt"], s3_server.storage_options)
    assert dataset.num_rows == 3_000 and len(dataset.files) == 30
    assert [f.first_row for f in dataset.files] == list(range(0, 3_000, 100))
    sizes = {p: i["size"] for p, i in s3_server.filesystem().find(url, detail=True).items()}
    assert {f.path: f.size for f in dataset.files} == sizes
    assert "in/part-017.parquet" in dataset.files[17].path
    with pytest.raises(Exception, match="column 'nope' not found"):
        open_dataset(url, ["nope"], s3_server.storage_options)


# -- the store: publishing and the ledger --------------------------------------------------------


def test_lost_workers_late_shard_never_appears(s3_server) -> None:
    """Two workers stage the same rows as uncompleted uploads; only the accepted one appears."""
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/out"
    options = s3_server.storage_options
    store = OutputStore(url, options)
    store.recover()
    clock = [0.0]
    sched = Scheduler(1000, SchedulerConfig(max_unit_rows=100, lease_timeout_s=10))
    coord = Coordinator(sched, store, {"spec": {}}, token="t", clock=lambda: clock[0])
    coord.start()
    try:
        host, port = coord.address
        a, b = Client(host, port, "t", retry_s=2), Client(host, port, "t", retry_s=2)
        a.call("hello", instance="a", weight=1)
        b.call("hello", instance="b", weight=1)
        lease = a.call("lease", instance="a")["lease"]
        clock[0] = 11  # a goes silent past its lease timeout
        sched.expire(clock[0])
        again = b.call("lease", instance="b")["lease"]
        start, end = lease["start"], lease["end"]
        assert (again["start"], again["end"]) == (start, end)
        table = pa.table({"x": list(range(start, end))})
        staged_b = stage_shard(url, options, "b.parquet", start, end, table, "zstd")
        staged_a = stage_shard(url, options, "a.parquet", start, end, table, "zstd")
        fs = s3_server.filesystem()
        assert fs.glob(f"{bucket}/out/*.parquet") == []  # staged uploads are invisible
        reply = b.call("commit", instance="b", lease=again["id"], start=start, end=end,
                       staging=staged_b)
        assert reply["status"] == "accepted"
        late = a.call("commit", instance="a", lease=lease["id"], start=start, end=end,
                      staging=staged_a)
        assert late["status"] == "duplicate"
        fs.invalidate_cache()
        assert fs.glob(f"{bucket}/out/*.parquet") == [
            f"{bucket}/out/part-{start:012d}-{end:012d}.parquet"
        ]
        assert pending_uploads(s3_server, bucket) == []  # the late upload was aborted
        assert [(r.start, r.end, r.instance) for r in store.read_ledger()] == [(start, end, "b")]
    finally:
        coord.stop()


def test_ledger_segments_from_concurrent_appends_compact_on_resume(s3_server) -> None:
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/out"
    store = OutputStore(url, s3_server.storage_options)
    store.recover()
    records = [CommitRecord(i * 10, i * 10 + 10, f"w{i % 4}") for i in range(200)]
    threads = [
        threading.Thread(target=lambda chunk=records[k::8]: [store.append(r) for r in chunk])
        for k in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fs = s3_server.filesystem()
    segments = fs.ls(f"{bucket}/out/_hetbatch/ledger")
    assert len(segments) == 200  # one segment per append, none overwriting another
    again = OutputStore(url, s3_server.storage_options)
    assert sorted((r.start, r.end) for r in again.read_ledger()) == [
        (r.start, r.end) for r in records
    ]
    assert sorted((r.start, r.end) for r in again.recover()) == [
        (r.start, r.end) for r in records
    ]
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/_hetbatch/ledger")  # folded into the base ledger
    text = fs.cat_file(f"{bucket}/out/_hetbatch/ledger.jsonl").decode()
    assert len(text.splitlines()) == 200


# -- whole jobs ----------------------------------------------------------------------------------


def _kill_a_worker_then_the_run(
    proc: subprocess.Popen, server: S3Server, url: str, first: int, more: int, timeout: float
) -> None:
    """Once `first` rows are committed, SIGKILL the worker that committed last (it holds
    leases); once `more` rows more are, SIGKILL the whole run midway."""
    wait_for_rows(server, url, first, timeout)
    last = max(committed(server, url), key=lambda r: r.at)
    os.kill(worker_pids(proc.pid)[last.instance], signal.SIGKILL)
    wait_for_rows(server, url, committed_rows(server, url) + more, timeout)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sim_job_on_s3_survives_a_killed_worker_and_sigkill(tmp_path, s3_server) -> None:
    """Credentials and endpoint in the job file's storage_options; none in the environment."""
    rows = 12_000
    bucket = s3_server.new_bucket()
    url = f"s3://{bucket}/out"
    options = s3_server.storage_options
    job = sim_job(
        tmp_path,
        Path("unused"),
        [sim_pool("a", 6_000), sim_pool("b", 6_000)],
        scheduler={"max_unit_rows": 200},
        launch={"max_worker_restarts": 0},
    )
    job["input"] = {**job["input"], "path": put_input(s3_server, bucket, rows, 4),
                    "storage_options": options}
    job["output"] = {"path": url, "storage_options": options}
    job_file = write_job(tmp_path / "job.yaml", job)
    proc = start_cli("run", str(job_file))
    _kill_a_worker_then_the_run(proc, s3_server, url, 800, 800, 120)
    fs = s3_server.filesystem()
    assert not fs.exists(f"{bucket}/out/_SUCCESS")
    midway = read_with_polars(s3_server, url)  # what a reader sees mid-job: rows at most once
    assert 0 < midway.height < rows and midway["id"].n_unique() == midway.height
    result = run_cli("run", str(job_file))
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    assert_every_row_once(s3_server, url, rows)
    assert pending_uploads(s3_server, bucket) == []
    assert fs.glob(f"{bucket}/out/_hetbatch/staging/*") == []


@pytest.mark.vllm
def test_vllm_demo_sized_job_on_s3(tmp_path, tiny_model, s3_env: S3Server) -> None:
    """The demo's 5,000 prompts on real vLLM, in and out of S3 reached through the environment:
    a worker killed, then the whole run SIGKILLed midway, then resumed."""
    bucket = s3_env.new_bucket()
    table = pq.read_table(DEMO_DATA, columns=["id", "prompt", "source"])
    rows = table.num_rows
    half = rows // 2
    put_table(s3_env, f"{bucket}/in/a.parquet", table.slice(0, half), row_group_size=250)
    put_table(s3_env, f"{bucket}/in/b.parquet", table.slice(half), row_group_size=250)
    url = f"s3://{bucket}/out"
    job = {
        "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": f"s3://{bucket}/in/", "prompt_column": "prompt", "id_column": "id",
                  "keep_columns": ["source"]},
        "chat": True,
        "sampling": {"max_tokens": 16, "temperature": 0.8, "top_p": 0.95},
        "seed": 5,
        "output": {"path": url},
        "scheduler": {"max_unit_rows": 250, "heartbeat_s": 0.5},
        "launch": {"max_worker_restarts": 1},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
    }
    job_file = write_job(tmp_path / "job.yaml", job)
    proc = start_cli("run", str(job_file))
    _kill_a_worker_then_the_run(proc, s3_env, url, 300, 500, 300)
    assert committed_rows(s3_env, url) < rows, "the run finished before it could be killed"
    result = run_cli("run", str(job_file), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    ids = sorted(table.column("id").to_pylist())
    df = read_with_polars(s3_env, url)
    assert df.height == rows and sorted(df["id"].to_list()) == ids
    assert df["error"].null_count() == rows and (df["completion_tokens"] > 0).all()
    arrow = read_with_pyarrow(s3_env, url)
    assert arrow.num_rows == rows and sorted(arrow.column("id").to_pylist()) == ids
    assert pending_uploads(s3_env, bucket) == []
