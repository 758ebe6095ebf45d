"""Helpers for tests that run whole jobs: inputs, job files, the CLI, and output checks."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

HETBATCH = [sys.executable, "-m", "hetbatch"]

# vLLM on the CPU with the tiny model: eager (no compile at start-up), a small KV cache.
TINY_ENGINE_ARGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 << 20,
    "max_num_seqs": 64,
}


def input_table(rows: int, words: int = 20) -> pa.Table:
    """Rows r000000, r000001, ... with prompts of 1 to `words` words and a topic to keep."""
    ids = [f"r{i:06d}" for i in range(rows)]
    prompts = [" ".join(["word"] * (1 + i % words)) + f" {i}" for i in range(rows)]
    return pa.table({"id": ids, "prompt": prompts, "topic": [f"t{i % 7}" for i in range(rows)]})


def make_input(path: Path, rows: int, row_group_size: int = 500, words: int = 20) -> Path:
    pq.write_table(input_table(rows, words), path, row_group_size=row_group_size)
    return path


def sim_job(tmp: Path, input_path: Path, pools: list[dict], **extra: Any) -> dict[str, Any]:
    job = {
        "model": {"path": "simulated"},
        "input": {
            "path": str(input_path),
            "prompt_column": "prompt",
            "id_column": "id",
            "keep_columns": ["topic"],
        },
        "output": {"path": str(tmp / "out")},
        "sampling": {"max_tokens": 8},
        "engine": {"kind": "sim"},
        "scheduler": {"max_unit_rows": 256, "heartbeat_s": 0.3},
        "cluster": {"pools": pools},
    }
    for key, value in extra.items():
        job[key] = {**job[key], **value} if isinstance(value, dict) and key in job else value
    return job


def sim_pool(name: str, tokens_per_s: float, max_num_seqs: int = 64, **kw: Any) -> dict:
    return {
        "name": name,
        "accelerator": "cpu",
        "devices_per_node": 1,
        "sim": {"tokens_per_s": tokens_per_s, "max_num_seqs": max_num_seqs},
        **kw,
    }


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_cli(
    *args: str, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*HETBATCH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def start_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*HETBATCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd
    )


def start_run(job_file: Path, out: Path, commits: int, *flags: str,
              timeout: float = 60) -> subprocess.Popen:
    """`hetbatch run JOB_FILE`, returned once `commits` units are in OUT's ledger; a run that
    does not get there in time is stopped (not left running) and its stderr shown."""
    proc = start_cli("run", str(job_file), *flags)
    try:
        wait_for(lambda: len(ledger(out)) >= commits, timeout, f"{commits} committed unit(s)")
    except AssertionError as exc:
        proc.terminate()  # the run stops its workers
        _stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"{exc}; the run's stderr:\n{stderr[-3000:]}") from None
    return proc


def read_output(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "*.parquet"))


def ledger(out: Path) -> list[dict[str, Any]]:
    path = out / "_hetbatch" / "ledger.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(parent_pid: int) -> dict[str, int]:
    """Worker processes started by a `hetbatch run` process, by instance id."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(parent_pid)],
                         capture_output=True, text=True).stdout
    pids = {}
    for line in out.splitlines():
        if "hetbatch.worker" in line:
            args = line.split()
            pids[args[args.index("--instance") + 1]] = int(args[0])
    return pids


def busy_worker(parent_pid: int, out: Path) -> int:
    """The pid of the worker that committed last: it is working, so it holds leases."""
    return worker_pids(parent_pid)[ledger(out)[-1]["instance"]]


def assert_exactly_once(out: Path, rows: int) -> pl.DataFrame:
    df = read_output(out)
    assert df.height == rows, f"{df.height} output rows for {rows} input rows"
    assert df["id"].n_unique() == rows
    assert sorted(df["id"].to_list()) == [f"r{i:06d}" for i in range(rows)]
    assert_ledger_covers(out, rows)
    return df


def assert_ledger_covers(out: Path, rows: int) -> None:
    """The job finished and its ledger holds every row exactly once: units of whole ranges
    never overlap, and the units that hold only some rows of a range (rows dealt by the
    context they need, each unit a band of needs) cover ranges no whole unit holds."""
    assert (out / "_SUCCESS").exists()
    records = ledger(out)
    whole = sorted((r["start"], r["end"]) for r in records if "above" not in r)
    banded = sorted({(r["start"], r["end"]) for r in records if "above" in r})
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(whole)), "ledger overlaps"
    assert not any(a < d and c < b for a, b in whole for c, d in banded), "ledger overlaps"
    covered = set()
    for a, b in banded:
        covered.update(range(a, b))
    assert sum(b - a for a, b in whole) + len(covered) == rows


os.environ.setdefault("PYTHONUNBUFFERED", "1")


PR_SET_CHILD_SUBREAPER = 36


def _children() -> list[int]:
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def _living(pid: int) -> str | None:
    """The name of process `pid`, or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return None if state == "Z" else name


@contextlib.contextmanager
def leftover_processes() -> Iterator[Callable[[float], list[str]]]:
    """Make this process the subreaper of all it starts (Linux), so that a process a run leaves
    behind comes back here instead of to init. Yields `left(wait_s)`: the names of the processes
    that came to be children here inside the block and are still alive after waiting up to
    `wait_s` for them to go (children from before, such as a session's servers, do not count).
    They are killed on exit."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    before = set(_children())
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)

    def new_children() -> list[int]:
        return [pid for pid in _children() if pid not in before]

    def left(wait_s: float) -> list[str]:
        deadline = time.monotonic() + wait_s
        while True:
            names = [n for n in map(_living, new_children()) if n is not None]
            if not names or time.monotonic() > deadline:
                return names
            time.sleep(0.2)

    try:
        yield left
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0)
        for pid in new_children():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
