"""Read a job's output folder (any fsspec store) into a `JobRun`.

Reads only what is small: the ledger (one line per unit), the job, plan and metrics records,
and a sample of the output shards' length columns; shards with errors are found from the ledger,
so finding error examples does not scan the output.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.errors import UserError
from hetbatch.io.parquet import shard_name
from hetbatch.io.paths import OutputPaths
from hetbatch.openai_batch import shard_columns
from hetbatch.report.model import ErrorKind, JobRun, Unit

LENGTH_SAMPLE_SHARDS = 64  # shards read for the length histograms, spread over the output
ERROR_SHARDS = 16  # shards with errors read for examples
EXAMPLES_PER_KIND = 3


def load_run(output: str, prices: dict[str, float] | None = None) -> JobRun:
    store = OutputStore(output)
    if not store.exists():
        raise UserError(f"{output}: no hetbatch job has written here")
    job = store.read_json(OutputPaths.JOB)
    records = store.read_ledger()
    metrics = _optional_json(store, OutputPaths.METRICS)
    plan = _optional_json(store, OutputPaths.PLAN)
    layout = _optional_json(store, OutputPaths.LAYOUT) or []
    complete = store.is_complete()

    timed = [r for r in records if r.leased_at > 0]
    started = _start_time(metrics, timed)
    pool_of = {i["instance_id"]: i["pool"] for i in layout if "instance_id" in i}
    pool_of.update({r.instance: r.pool for r in records if r.pool})
    if metrics:
        pool_of.update({k: m["pool"] for k, m in metrics.get("instances", {}).items()})
    units = [_unit(r, started, pool_of) for r in records if r.instance != "recovered"]
    if complete and metrics and started == metrics.get("started_at"):
        makespan = float(metrics["wall_s"])  # one run, timed by its coordinator
    else:  # running, or resumed over several runs: up to now, or to the last commit
        last = max((r.at for r in records), default=started)
        makespan = (last if complete else time.time()) - started
    spec = job["spec"]
    pools = spec["cluster"]["pools"]
    suffix = ".jsonl" if spec["output"].get("format") == "openai-batch" else ".parquet"
    prompts, completions, note = _lengths(store, records, suffix)
    return JobRun(
        title=str(spec["output"]["path"]),
        source="run",
        state="complete" if complete else "in progress",
        rows_total=int(job["rows"]),
        units=units,
        pool_of={**pool_of, **{u.instance: u.pool for u in units}},
        makespan_s=max(makespan, 0.0),
        planned_rates=_planned_rates(plan),
        pool_devices=_devices(pools),
        prices={**_job_prices(pools), **(prices or {})},
        errors=_errors(store, records, spec, suffix),
        prompt_lengths=prompts,
        completion_lengths=completions,
        lengths_note=note,
        unrecorded_rows=sum(r.row_count for r in records if r.leased_at <= 0),
    )


def _optional_json(store: OutputStore, name: str) -> Any:
    return store.read_json(name) if store.paths.files.exists(name) else None


def _start_time(metrics: dict[str, Any] | None, timed: list[CommitRecord]) -> float:
    """The coordinator's start (from the metrics of a finished run), else the first lease."""
    first = min((r.leased_at for r in timed), default=None)
    if metrics and "started_at" in metrics:
        begun = float(metrics["started_at"])
        return begun if first is None else min(begun, first)
    return first if first is not None else time.time()


def _unit(r: CommitRecord, started: float, pool_of: dict[str, str]) -> Unit:
    return Unit(
        instance=r.instance,
        pool=r.pool or pool_of.get(r.instance, "?"),
        row0=r.start,
        row1=r.end,
        leased_s=r.leased_at - started if r.leased_at > 0 else None,
        committed_s=r.at - started,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        errors=r.errors,
        stolen=r.stolen,
        redealt=r.redealt,
        kept=r.rows,
    )


def _planned_rates(plan: dict[str, Any] | None) -> dict[str, float]:
    if not plan:
        return {}
    return {p["pool"]: float(p["output_tokens_per_s"]) for p in plan.get("pools", [])}


def _job_prices(pools: list[dict[str, Any]]) -> dict[str, float]:
    """Per device-hour, as the job priced its pools (the prices of the run's own cost)."""
    return {
        p["name"]: float(p["price_per_device_hour"])
        for p in pools
        if p.get("price_per_device_hour") is not None
    }


def _devices(pools: list[dict[str, Any]]) -> dict[str, int]:
    return {p["name"]: int(p["devices_per_node"]) * int(p.get("nodes", 1)) for p in pools}


def _read(
    store: OutputStore, r: CommitRecord, columns: list[str], suffix: str
) -> dict[str, list]:
    """Columns of a unit's shard, in the job's output format (`suffix`)."""
    path = store.path(shard_name(r.start, r.end, suffix, *r.band))
    if suffix == ".jsonl":  # OpenAI's batch layout
        return shard_columns(store.fs.cat_file(path).decode(), columns)
    with store.fs.open(path, "rb") as fh:
        return pq.read_table(fh, columns=columns).to_pydict()


def _lengths(
    store: OutputStore, records: list[CommitRecord], suffix: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """Prompt and completion lengths of the rows of up to LENGTH_SAMPLE_SHARDS shards."""
    if not records:
        return np.zeros(0), np.zeros(0), "no shards yet"
    step = max(len(records) // LENGTH_SAMPLE_SHARDS, 1)
    chosen = records[::step][:LENGTH_SAMPLE_SHARDS]
    prompts: list[int] = []
    completions: list[int] = []
    for r in chosen:
        cols = _read(store, r, ["prompt_tokens", "completion_tokens", "error"], suffix)
        for p, c, e in zip(cols["prompt_tokens"], cols["completion_tokens"], cols["error"],
                           strict=True):
            if e is None:
                prompts.append(p or 0)
                completions.append(c or 0)
    sampled = len(chosen) < len(records)
    note = (f"rows of {len(chosen)} of {len(records)} shards, spread over the output"
            if sampled else f"all {len(prompts):,} rows without an error")
    return np.asarray(prompts), np.asarray(completions), note


def error_kind(message: str) -> str:
    """Group messages by their wording, not their numbers or quoted values."""
    first_line = message.splitlines()[0] if message else ""
    return re.sub(r"\d+", "N", first_line)[:100]


def _errors(
    store: OutputStore, records: list[CommitRecord], spec: dict[str, Any], suffix: str
) -> list[ErrorKind]:
    with_errors = [r for r in records if r.errors > 0]
    if not with_errors:
        return []
    id_column = spec["input"].get("id_column") or "row_id"
    counts: Counter[str] = Counter()
    examples: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in with_errors[:ERROR_SHARDS]:
        cols = _read(store, r, [id_column, "error"], suffix)
        for row_id, message in zip(cols[id_column], cols["error"], strict=True):
            if message is None:
                continue
            kind = error_kind(message)
            counts[kind] += 1
            if len(examples[kind]) < EXAMPLES_PER_KIND:
                examples[kind].append((str(row_id), message))
    unread = sum(r.errors for r in with_errors[ERROR_SHARDS:])
    kinds = [ErrorKind(k, n, tuple(examples[k])) for k, n in counts.most_common()]
    if unread:
        kinds.append(ErrorKind("in shards not read for examples", unread, ()))
    return kinds
