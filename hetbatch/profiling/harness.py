"""Profiling a job: time the real engine on this machine and fit the planner's coefficients.

For every accelerator type among the job's pools, one child process per instance of the pool's
first node, each pinned to that instance's devices and all running at once, runs the job's model
with its engine arguments at a few concurrencies and two shapes (the job's own prompt/output
lengths, and long prompts with short outputs); the planner's coefficients are fitted to the
timings by least squares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths
from hetbatch.planner.calibration import (
    Calibration,
    Measurement,
    fit_calibration,
    measurement_features,
)
from hetbatch.planner.catalog import DEFAULT_CATALOG
from hetbatch.planner.model import Coefficients
from hetbatch.planning import (
    model_from_job,
    workload_from_job,
)
from hetbatch.spec import JobSpec, PoolSpec, load_job

DEFAULT_MAX_SEQS = 256  # vLLM's max_num_seqs when the job leaves it unset
CHILD_TIMEOUT_S = 900
RUN_ROWS = 2000  # rows of the job's input in the short real run
RUN_WEIGHT = 3  # the real run counts as this many points in the fit


@dataclass(frozen=True)
class ProfileResult:
    """The fitted calibration and the measurements it came from."""

    calibration: Calibration
    measurements: tuple[Measurement, ...]


def default_out(job_path: str) -> Path:
    """`jobs/demo.yaml` -> `jobs/demo.calibration.json`."""
    path = Path(job_path)
    return path.with_name(f"{path.stem}.calibration.json")


def profile_job(
    job_path: str, concurrency: Sequence[int] = (),
    pools: Sequence[str] = (), base: Calibration | None = None, run_rows: int = 0,
) -> ProfileResult:
    """Benchmark one pool per accelerator type and fit its coefficients; the concurrencies
    default to an eighth, half and all of the job's max_num_seqs, where the plan operates."""
    job = load_job(job_path)
    points = profile_points(job, concurrency or default_concurrency(job))
    found: list[Measurement] = []
    for pool in _pools_to_profile(job, pools):
        engine_alone = _run_child(job_path, job, pool, points)
        found.extend(engine_alone)
        if run_rows:
            found.extend([_run_measurement(job, pool, run_rows, engine_alone)] * RUN_WEIGHT)
    model = model_from_job(job)
    cal = fit_calibration(found, profiles={job.model.path: model}, base=base)
    if base is not None:
        cal = Calibration({**base.coefficients, **cal.coefficients},
                          {**base.measurements, **cal.measurements})
    return ProfileResult(cal, tuple(found))


def _run_measurement(
    job: JobSpec, pool: PoolSpec, rows: int, engine_alone: Sequence[Measurement]
) -> Measurement:
    """Steady output tokens/s per instance of a short real run of the job on one node of the
    pool: the engine inside its worker, beside its neighbours, with the job's own prompts.

    Timing the engine alone misses what a run adds (reading, templating, writing, the
    coordinator, instances sharing a node); this point pins the fit to the operating point the
    plan is for.
    """
    from hetbatch.io.parquet import open_dataset, read_rows, write_table
    from hetbatch.prompts import input_columns

    with tempfile.TemporaryDirectory(prefix="hetbatch-profile-run-") as tmp:
        dataset = open_dataset(job.input.path, input_columns(job), input_format=job.input.format)
        sample = read_rows(dataset, 0, min(rows, dataset.num_rows), input_columns(job))
        spec = job.to_dict()
        if job.input.format == "openai-batch":  # the sample's request lines, as they were
            lines = "".join(f"{line}\n" for line in sample.column("request").to_pylist())
            Path(tmp, "input.jsonl").write_text(lines)
            spec["input"]["path"] = f"{tmp}/input.jsonl"
        else:
            write_table(f"{tmp}/input.parquet", sample, "zstd")
            spec["input"]["path"] = f"{tmp}/input.parquet"
        spec["output"]["path"] = f"{tmp}/out"
        spec["cluster"]["pools"] = [{**p, "nodes": 1} for p in spec["cluster"]["pools"]
                                    if p["name"] == pool.name]
        (Path(tmp) / "job.yaml").write_text(yaml.safe_dump(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "hetbatch", "run", f"{tmp}/job.yaml", "--no-progress"],
            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
        )
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"profiling run of pool {pool.name!r} failed: {tail}")
        metrics = json.loads((Path(tmp) / "out" / OutputPaths.METRICS).read_text())
    insts = [m for m in metrics["instances"].values() if m["active_s"] > 0 and m["rows"]]
    rate = sum(m["completion_tokens"] / m["active_s"] for m in insts) / len(insts)
    n = sum(m["rows"] for m in insts)
    top = max(engine_alone, key=lambda m: m.concurrency)
    return replace(
        top, input_len=sum(m["prompt_tokens"] for m in insts) / n,
        output_len=sum(m["completion_tokens"] for m in insts) / n,
        output_tokens_per_s=rate, elapsed_s=None, num_requests=None,
    )


def default_concurrency(job: JobSpec) -> list[int]:
    cap = int(job.model.engine_args.get("max_num_seqs") or DEFAULT_MAX_SEQS)
    return sorted({max(1, cap // 8), max(1, cap // 2), cap})


def profile_points(job: JobSpec, concurrency: Sequence[int]) -> list[tuple[int, int, int]]:
    """(concurrency, input_len, output_len): the job's shape at every concurrency, and long
    prompts with short outputs at the largest, which sets prefill apart from decode."""
    w = workload_from_job(job, sample_rows=500)
    limit = int(job.model.engine_args.get("max_model_len") or 2048)
    inp = max(2, round(w.input_len_mean))
    out = max(2, round(w.output_len_mean))
    long_in = max(inp, min(4 * inp, limit - 8))
    points = [(b, inp, out) for b in sorted(set(concurrency))]
    points.append((max(concurrency), long_in, max(2, out // 4)))
    return points


def _pools_to_profile(job: JobSpec, names: Sequence[str]) -> list[PoolSpec]:
    """The first pool of every accelerator type (or the named pools)."""
    known = {p.name: p for p in job.cluster.pools}
    missing = [n for n in names if n not in known]
    if missing:
        raise UserError(f"no pool named {missing[0]!r}; pools: {', '.join(known)}")
    chosen: dict[str, PoolSpec] = {}
    for p in (known[n] for n in names) if names else job.cluster.pools:
        chosen.setdefault(DEFAULT_CATALOG.get(p.accelerator).name, p)
    return list(chosen.values())


def _node_envs(job: JobSpec, pool: PoolSpec) -> list[dict[str, str]]:
    """The environments of every instance on the pool's first node, each pinned to its own
    cores or GPUs: they run side by side, as in a real run, and share what a node shares
    (memory bandwidth, caches, the host)."""
    from hetbatch.layout import device_env, instance_layout

    node = [i for i in instance_layout(job) if i.pool == pool.name and i.node == 0]
    return [{**os.environ, **device_env(i)} for i in node]


def _run_child(
    job_path: str, job: JobSpec, pool: PoolSpec, points: list[tuple[int, int, int]]
) -> list[Measurement]:
    """Run the points on every instance of one node at once; each instance's timings count."""
    with tempfile.TemporaryDirectory(prefix="hetbatch-profile-") as tmp:
        plan = Path(tmp) / "points.json"
        plan.write_text(json.dumps(points))
        outs = [Path(tmp) / f"measurements-{k}.json" for k in range(len(_node_envs(job, pool)))]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "hetbatch.profiling.timing", job_path, pool.name,
                 str(plan), str(out)],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )
            for env, out in zip(_node_envs(job, pool), outs, strict=True)
        ]
        found: list[Measurement] = []
        for proc, out in zip(procs, outs, strict=True):
            try:
                _, stderr = proc.communicate(timeout=CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise UserError(
                    f"profiling pool {pool.name!r} took over {CHILD_TIMEOUT_S} s"
                ) from None
            if proc.returncode != 0 or not out.exists():
                tail = (stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"profiling pool {pool.name!r} failed: {tail}")
            found.extend(Measurement.from_dict(d) for d in json.loads(out.read_text()))
        return found


def predicted_time(m: Measurement, job: JobSpec, coef: Coefficients) -> float:
    """What the throughput model says the measured run should take under `coef`."""
    acc = DEFAULT_CATALOG.get(m.accelerator)
    return measurement_features(m, model_from_job(job), acc, coef).time(coef)
