"""Healing at run time: workers that are told to stop, hang, fail to write or fail to start
give their work back and the job carries on, each row once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests import flakyfs
from tests.jobutil import (
    HETBATCH,
    TINY_ENGINE_ARGS,
    assert_exactly_once,
    busy_worker,
    ledger,
    make_input,
    read_output,
    run_cli,
    sim_job,
    sim_pool,
    start_cli,
    start_run,
    wait_for,
    worker_pids,
    write_job,
)


def test_sigterm_gives_leases_back_at_once(tmp_path: Path) -> None:
    rows = 6_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        scheduler={"max_unit_rows": 300, "lease_timeout_s": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 2, "--no-progress")
    victim = ledger(out)[-1]["instance"]
    os.kill(busy_worker(proc.pid, out), signal.SIGTERM)
    stopped_at = time.time()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"worker {victim} stopped on SIGTERM, its leases given back; restarting (1/2)" in stderr
    assert_exactly_once(out, rows)
    log = (out / "_hetbatch" / "logs" / f"{victim}.log").read_text()
    assert "lease(s) given back [" in log, log
    # Its rows were dealt again long before a lease could lapse (300 s).
    redealt = [r for r in ledger(out) if r.get("redealt")]
    assert redealt, "no unit was re-dealt"
    assert all(r["at"] - stopped_at < 60 for r in redealt)


def test_hung_engine_gives_leases_back_and_is_restarted(tmp_path: Path) -> None:
    rows = 6_000
    hang = tmp_path / "hang-now"
    pools = [sim_pool("a", 4_000), sim_pool("b", 4_000)]
    for pool in pools:
        pool["sim"]["hang_file"] = str(hang)  # whichever engine sees it first hangs
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        pools,
        scheduler={"max_unit_rows": 300, "lease_timeout_s": 300},
        engine={"hang_timeout_s": 2},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 2, "--no-progress")
    hang.touch()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not hang.exists()  # an engine took it, and hung
    line = next(x for x in stderr.splitlines() if "found its engine hung" in x)
    assert line.endswith("gave its leases back; restarting (1/2)"), stderr
    victim = line.split()[1]
    log = (out / "_hetbatch" / "logs" / f"{victim}.log").read_text()
    assert "engine hung: no step finished in " in log, log  # 2 s or a little more
    assert "request(s) in it; giving leases back and exiting to be restarted" in log
    assert_exactly_once(out, rows)
    assert any(r.get("redealt") for r in ledger(out))


def _run_with_flaky_store(
    tmp_path: Path, rows: int, switch: Path, once: bool
) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out"
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        output={"path": f"{flakyfs.PROTOCOL}://{out}"},
        scheduler={"max_unit_rows": 300},
    )
    env = {
        **os.environ,
        "PYTHONPATH": flakyfs.install(tmp_path / "site"),
        "FLAKY_SWITCH": str(switch),
        **({"FLAKY_ONCE": "1"} if once else {}),
    }
    proc = subprocess.Popen(
        [*HETBATCH, "run", str(write_job(tmp_path / "job.yaml", job)), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    return proc, out


def _shards(out: Path) -> list[Path]:
    return sorted(out.glob("*.parquet"))


def _every_row_once(out: Path, rows: int) -> None:
    """On a store the ledger is in segments; the shards themselves tell."""
    assert (out / "_SUCCESS").exists()
    ids = read_output(out)["id"].to_list()
    assert sorted(ids) == [f"r{i:06d}" for i in range(rows)]


def test_a_failed_shard_write_is_retried(tmp_path: Path) -> None:
    rows = 3_000
    switch = tmp_path / "fail-next-write"
    proc, out = _run_with_flaky_store(tmp_path, rows, switch, once=True)
    wait_for(lambda: len(_shards(out)) >= 2, 60, "first shards")
    switch.touch()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not switch.exists()  # one write failed
    line = next(x for x in stderr.splitlines() if "could not write rows [" in x)
    assert "): OSError: [Errno 5] the store refused the write: '" in line, line
    assert line.endswith(".parquet'; re-queued"), line
    _every_row_once(out, rows)


def test_shard_writes_that_keep_failing_stop_the_job(tmp_path: Path) -> None:
    rows = 30_000
    switch = tmp_path / "fail-every-write"
    proc, out = _run_with_flaky_store(tmp_path, rows, switch, once=False)
    wait_for(lambda: len(_shards(out)) >= 2, 60, "first shards")
    switch.touch()
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("hetbatch: job failed: cannot write the output: OSError: [Errno 5] "
                           "the store refused the write"), stderr
    assert "shard writes failed in a row" in last and "rows committed and kept" in last
    assert "Traceback" not in stderr
    assert not (out / "_SUCCESS").exists()
    for shard in _shards(out):  # every visible shard whole
        pq.read_metadata(shard)
    switch.unlink()
    proc, out = _run_with_flaky_store(tmp_path, rows, switch, once=False)
    _stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    _every_row_once(out, rows)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (root only), unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)
    return filler


def test_a_full_disk_stops_the_job_and_a_rerun_resumes(tmp_path: Path, small_disk: Path) -> None:
    rows = 30_000
    out = small_disk / "out"
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        output={"path": str(out)},
        scheduler={"max_unit_rows": 300},
    )
    job_file = write_job(tmp_path / "job.yaml", job)
    proc = start_cli("run", str(job_file), "--no-progress")
    wait_for(lambda: len(_shards(out)) >= 2, 60, "first shards")
    filler = _fill(small_disk)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("hetbatch: job failed: cannot write the output: OSError: [Errno 28] "
                           "No space left on device"), stderr
    assert "Traceback" not in stderr
    assert not (out / "_SUCCESS").exists()
    for shard in _shards(out):  # every visible shard whole
        pq.read_metadata(shard)
    filler.unlink()
    again = start_cli("run", str(job_file), "--no-progress")
    _stdout, stderr = again.communicate(timeout=180)
    assert again.returncode == 0, stderr
    assert_exactly_once(out, rows)


def test_a_stopped_vllm_worker_is_killed_and_restarted(tmp_path: Path, tiny_model: Path) -> None:
    """SIGSTOP freezes the whole worker, so it cannot see its own hang: its supervisor sees
    its liveness file go stale, kills it (the coordinator gets the leases back as the
    connection drops) and starts another."""
    rows = 4_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1, "tensor_parallel_size": 1}],
        model={"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        engine={"kind": "vllm", "hang_timeout_s": 6},
        sampling={"max_tokens": 32, "temperature": 0},
        scheduler={"max_unit_rows": 128, "lease_timeout_s": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 1, "--no-progress", timeout=120)
    stopped = busy_worker(proc.pid, out)
    os.kill(stopped, signal.SIGSTOP)
    _stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr
    assert "worker cpu-0-0 unresponsive for " in stderr, stderr
    assert "(stopped or frozen); killing it" in stderr
    assert "worker cpu-0-0 exited (-9); restarting (1/2)" in stderr
    df = assert_exactly_once(out, rows)
    assert df["error"].null_count() == rows


def test_a_worker_stopped_at_once_is_killed_and_restarted(tmp_path: Path) -> None:
    """SIGSTOP right after the worker's first commit (its first second of work) is noticed."""
    rows = 6_000
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        engine={"hang_timeout_s": 3},
        scheduler={"max_unit_rows": 300, "lease_timeout_s": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 1, "--no-progress")
    victim = ledger(out)[-1]["instance"]  # it is working, so it holds leases
    os.kill(worker_pids(proc.pid)[victim], signal.SIGSTOP)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert f"worker {victim} unresponsive for " in stderr, stderr
    assert f"worker {victim} exited (-9); restarting (1/2)" in stderr
    assert_exactly_once(out, rows)


def test_an_engine_too_big_for_its_memory_starts_smaller(tmp_path: Path, tiny_model: Path) -> None:
    """A KV cache of 300 kB holds 128 tokens of the tiny model, not the 512 asked for: the
    worker starts vLLM again with the context vLLM says fits, says so, and the job runs."""
    rows = 300
    small_cache = {**TINY_ENGINE_ARGS, "kv_cache_memory_bytes": 300_000, "max_num_seqs": 8}
    job = sim_job(
        tmp_path,
        make_input(tmp_path / "in.parquet", rows, words=5),
        [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 1, "tensor_parallel_size": 1}],
        model={"path": str(tiny_model), "engine_args": small_cache},
        engine={"kind": "vllm"},
        sampling={"max_tokens": 16, "temperature": 0},
        scheduler={"max_unit_rows": 100},
    )
    out = tmp_path / "out"
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)), "--no-progress")
    assert result.returncode == 0, result.stderr
    log = (out / "_hetbatch" / "logs" / "cpu-0-0.log").read_text()
    fits = "engine did not fit in memory (To serve at least one request with the model's max"
    assert fits in log, log
    assert "starting it again with max_model_len=128 (was max_model_len=512)" in log
    assert log.count("started cpu-0-0") == 1  # one process: no crash loop
    df = assert_exactly_once(out, rows)
    assert df["error"].null_count() == rows and (df["completion_tokens"] > 0).all()
