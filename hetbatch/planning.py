"""Planning a job file: the files the pure planner is fed from, read here.

Model profile, pools and a workload sampled from the job's Parquet input, and calibration
files. The workload is measured, not guessed: a sample of the input's prompt column is rendered
the way the worker renders it (template, chat template) and counted with the model's own
tokenizer when a local one loads, else estimated at four bytes a token.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hetbatch.errors import UserError
from hetbatch.io.sample import InputSample, read_sample
from hetbatch.planner.calibration import Calibration, coefficients_or_default
from hetbatch.planner.catalog import DEFAULT_CATALOG, Catalog, with_overrides
from hetbatch.planner.length_mix import pool_workloads
from hetbatch.planner.model import (
    drain_step_s,
    prompt_token_cost,
)
from hetbatch.planner.profile import ModelProfile, load_model_profile
from hetbatch.planner.search import deployment, plan_cluster
from hetbatch.planner.types import ClusterPlan, PoolRequest, Workload
from hetbatch.prompts import RowError, row_prompt
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import make_scheduler
from hetbatch.sim.simulation import SimConfig, SimInstance, poll_interval, simulate
from hetbatch.sim.workload import LengthDist, RowWork
from hetbatch.spec import JobSpec, template_fields

BYTES_PER_TOKEN = 4.0
_DTYPES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
           "bfloat16": "bf16"}


@dataclass(frozen=True)
class JobPlanInputs:
    """What a job file contributes to planning."""

    model: ModelProfile
    pools: list[PoolRequest]
    workload: Workload
    catalog: Catalog | None = None
    calibration: Calibration | None = None
    input_sample: tuple[int, ...] = ()  # prompt lengths measured on the input, if any
    # The rows each pool will receive, when pools differ in the context their engines hold.
    pool_workloads: dict[str, Workload] = field(default_factory=dict)


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file written by `hetbatch profile`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read calibration file {path}: {exc}") from exc
    return Calibration.from_dict(data)


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    Path(path).write_text(json.dumps(calibration.to_dict(), indent=2, sort_keys=True) + "\n")


def plan_job(
    job: JobSpec, calibration: Calibration | None = None, sample_rows: int = 2000,
    objective: str = "throughput", top_k: int = 3,
) -> ClusterPlan:
    """The cluster plan for a job: one deployment per pool with its expected tokens/s."""
    inputs = job_plan_inputs(job, calibration, sample_rows)
    return plan_cluster(inputs.model, inputs.pools, inputs.workload, objective=objective,
                        catalog=inputs.catalog, calibration=inputs.calibration, top_k=top_k,
                        pool_workloads=inputs.pool_workloads)


def replanner_for(job: JobSpec, inputs: JobPlanInputs, plan: ClusterPlan) -> Any:
    """The `Replanner` of a job that asks for re-planning (`replan.enabled`): the pools the
    planner sized (not those that pin their layout, nor instances spanning nodes), each against
    the coefficients its plan was made with."""
    from hetbatch.planner.replan import PlanContext, Replanner, ReplanPolicy

    catalog = inputs.catalog or DEFAULT_CATALOG
    pinned = {p.name for p in job.cluster.pools if p.tensor_parallel_size is not None}
    plans = {p.pool: p for p in plan.pools
             if p.pool not in pinned and p.config.pipeline_parallel_size == 1}
    coefs = {p.pool: coefficients_or_default(catalog.get(p.accelerator), inputs.calibration)
             for p in plan.pools}
    ctx = PlanContext(inputs.model, {p.name: p for p in inputs.pools}, inputs.workload,
                      catalog=inputs.catalog, coefficients=coefs)
    r = job.replan
    policy = ReplanPolicy(r.threshold, r.margin, r.min_units, r.min_active_s)
    return Replanner(ctx, plans, policy)


def job_plan_inputs(
    job: JobSpec, calibration: Calibration | None = None, sample_rows: int = 2000,
    sample: InputSample | None = None,
) -> JobPlanInputs:
    """Model, pools and workload of a job file (`sample`: the input's, if already read)."""
    model = model_from_job(job)
    catalog = with_overrides(job.accelerators) if job.accelerators else None
    lengths, rows = sampled_prompt_lengths(job, sample_rows, sample)
    workload = _workload(job, lengths, rows)
    return JobPlanInputs(model, pools_from_job(job), workload,
                         catalog=catalog, calibration=calibration, input_sample=tuple(lengths),
                         pool_workloads=pool_length_mix(job, lengths, workload))


def pool_length_mix(job: JobSpec, lengths: list[int], workload: Workload) -> dict[str, Workload]:
    """The rows each pool will receive when pools set different max_model_len (in the pool's
    or the model's engine_args): rows longer than a pool's context go to the others."""
    contexts = {}
    for p in job.cluster.pools:
        value = {**job.model.engine_args, **p.engine_args}.get("max_model_len")
        contexts[p.name] = None if value is None else int(value)
    if len(set(contexts.values())) < 2:
        return {}
    shares = {p.name: float(p.devices_per_node * p.nodes) for p in job.cluster.pools}
    return pool_workloads(lengths, workload, contexts, shares)


def model_from_job(job: JobSpec) -> ModelProfile:
    """The model's profile under the weight format the engine arguments ask for."""
    args = job.model.engine_args
    quant = str(args["quantization"]).lower() if args.get("quantization") == "fp8" else None
    if quant is None and args.get("dtype") not in (None, "auto"):
        quant = _DTYPES.get(str(args["dtype"]).lower())
    return load_model_profile(job.model.path, quant)


def pools_from_job(job: JobSpec) -> list[PoolRequest]:
    """Pool requests; pinned TP, instances per node, max_num_seqs, max_num_batched_tokens,
    gpu_memory_utilization and kv_cache_dtype (in the model's or the pool's engine_args)
    restrict the search."""
    out = []
    for p in job.cluster.pools:
        args = {**job.model.engine_args, **p.engine_args}
        out.append(PoolRequest(
            name=p.name, accelerator=p.accelerator, devices_per_node=p.devices_per_node,
            nodes=p.nodes, tensor_parallel_size=p.tensor_parallel_size,
            instances_per_node=p.instances_per_node,
            max_num_seqs=_int_or_none(args.get("max_num_seqs")),
            max_num_batched_tokens=_int_or_none(args.get("max_num_batched_tokens")),
            kv_cache_dtypes=kv_cache_dtypes(args.get("kv_cache_dtype")),
            gpu_memory_utilization=_float_or_none(args.get("gpu_memory_utilization")),
        ))
    return out


def kv_cache_dtypes(value: Any) -> tuple[str, ...]:
    """The KV formats to search for an engine_args or CLI value: unset keeps the model's dtype,
    "any" tries it and FP8, anything else is pinned."""
    if value is None:
        return ("auto",)
    key = str(value).lower()
    return ("auto", "fp8") if key == "any" else (key,)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def workload_from_job(job: JobSpec, sample_rows: int = 2000) -> Workload:
    """Prompt lengths from a sample of the input; output length from sampling.max_tokens."""
    return _workload(job, *sampled_prompt_lengths(job, sample_rows))


def _workload(job: JobSpec, prompt_lengths: list[int], rows: int) -> Workload:
    max_tokens = int(job.sampling.get("max_tokens") or 16)
    return Workload.from_samples(prompt_lengths, float(max_tokens), rows=rows,
                                 output_len_max=max_tokens)


def sampled_prompt_lengths(
    job: JobSpec, sample_rows: int = 2000, sample: InputSample | None = None
) -> tuple[list[int], int]:
    """Token lengths of a sample of the input's prompts (`sample`, else one read here), and
    the input's row count."""
    if sample is None:
        sample = read_sample(job, sample_rows=sample_rows)
    fields = template_fields(job.prompt_template or "")
    prompts = [p for p in (_render(job, row, fields) for row in sample.rows) if p is not None]
    if not prompts:
        raise UserError(f"{job.input.path}: the sampled rows hold no usable prompt")
    counter = token_counter(job.model.path)
    return [max(1, counter(p)) for p in prompts], sample.total_rows


def _render(
    job: JobSpec, row: dict[str, Any], fields: list[str]
) -> list[dict[str, str]] | str | None:
    """The row's prompt exactly as a worker builds it, or None for a row that would error."""
    if job.input.format == "openai-batch":
        from hetbatch.openai_batch import RequestError, parse_request

        try:
            return parse_request(row["request"])[2]
        except RequestError:
            return None
    try:
        return row_prompt(job, row, fields)
    except RowError:
        return None


def token_counter(model_path: str) -> Callable[[list[dict[str, str]] | str], int]:
    """Token count of a prompt or chat: the model's tokenizer and chat template when a local
    tokenizer.json loads, else bytes / 4."""
    folder = Path(model_path)
    tok = _load_tokenizer(folder)
    template = _load_chat_template(folder)

    def count(prompt: list[dict[str, str]] | str) -> int:
        text = prompt if isinstance(prompt, str) else _chat_text(prompt, template)
        if tok is None:
            return max(1, round(len(text.encode()) / BYTES_PER_TOKEN))
        return len(tok.encode(text).ids)

    return count


def _chat_text(messages: list[dict[str, str]], template: Callable[..., str] | None) -> str:
    if template is None:
        return "\n".join(m["content"] for m in messages)
    return template(messages)


def _load_tokenizer(folder: Path) -> Any:
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a tokenizer that does not load falls back to the byte estimate
        return None


def _load_chat_template(folder: Path) -> Callable[..., str] | None:
    """The model's chat template as a function of the messages, rendered as vLLM renders it."""
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "tokenizer_config.json").read_text())
    source = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text()
    if not isinstance(source, str):
        return None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compiled = ImmutableSandboxedEnvironment().from_string(source)
    except Exception:  # no jinja2 or a template it cannot parse: count the contents only
        return None
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, **specials)

    return render


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)



# -- the job's makespan: the plan run through the simulator ------------------------------------

SIM_ROWS_MAX = 50_000  # rows simulated; beyond them the job runs at its steady rate
FORECAST_DRAWS = 3
Z95 = 1.6449


@dataclass(frozen=True)
class Makespan:
    """How long the job takes: the steady-state figure and the simulated one with its band.

    `low_s`/`high_s` are the extremes over `draws` simulations with lengths drawn afresh; the
    simulation adds what a steady rate leaves out: the ramp, the drain of the last requests at
    one token a step, and the imbalance of the last units between instances.
    """

    rows: int
    steady_s: float
    makespan_s: float
    low_s: float
    high_s: float
    draws: int
    simulated_rows: int
    compute_s: float

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def lognormal_sigma(mean: float, p95: float) -> float:
    """Spread of a lognormal with this mean and 95th percentile (0 when they are equal)."""
    ratio = math.log(max(p95, mean) / mean)
    disc = Z95 * Z95 - 2 * ratio
    return Z95 - math.sqrt(disc) if disc > 0 else Z95


def capped_lognormal(mean: float, sigma: float, cap: float | None) -> LengthDist:
    """A lognormal of spread `sigma` capped at `cap` whose capped mean is `mean`: the median is
    found by bisection on the closed-form mean of min(X, cap)."""
    if sigma <= 0 or cap is None or mean >= cap:
        return LengthDist(min(mean, cap or mean), sigma=0.0, maximum=None if cap is None
                          else int(cap))

    def capped_mean(mu: float) -> float:
        z = (math.log(cap) - mu) / sigma
        below = math.exp(mu + sigma * sigma / 2) * _phi(z - sigma)
        return below + cap * (1 - _phi(z))

    lo, hi = math.log(mean) - 4 * sigma, math.log(cap) + 4 * sigma
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if capped_mean(mid) < mean else (lo, mid)
    return LengthDist(math.exp((lo + hi) / 2), sigma=sigma, maximum=int(cap))


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def forecast_makespan(
    inputs: JobPlanInputs,
    plan: ClusterPlan,
    *,
    output_sigma: float = 0.5,
    scheduler: SchedulerConfig | None = None,
    heartbeat_s: float = 1.0,
    draws: int = FORECAST_DRAWS,
    seed: int = 0,
) -> Makespan | None:
    """Simulate the job on the plan's instances (the simulator `hetbatch simulate` runs, with
    the real scheduler); None when the row count is unknown."""
    started = time.perf_counter()
    w = inputs.workload
    if not w.rows:
        return None
    insts, prompt_cost = _plan_instances(inputs, plan)
    per_row = w.output_len_mean + prompt_cost * w.input_len_mean
    cluster_speed = sum(i.speed for i in insts)
    sim_rows = min(w.rows, SIM_ROWS_MAX)
    poll = poll_interval(i.max_num_seqs / i.speed for i in insts)
    cfg = SimConfig(heartbeat_s=heartbeat_s, poll_s=poll, record=False)
    rng = np.random.default_rng(seed)
    spans = []
    for _ in range(max(1, draws)):
        work = _draw_work(w, sim_rows, rng, inputs.input_sample, output_sigma, prompt_cost)
        sched = make_scheduler("hetbatch", sim_rows, scheduler or SchedulerConfig())
        result = simulate(sched, insts, work, cfg)
        rest = (w.rows - sim_rows) * work.total / sim_rows / cluster_speed
        spans.append(result.makespan + rest)
    spans.sort()
    return Makespan(
        rows=w.rows, steady_s=w.rows * per_row / cluster_speed,
        makespan_s=spans[len(spans) // 2], low_s=spans[0], high_s=spans[-1], draws=len(spans),
        simulated_rows=sim_rows, compute_s=time.perf_counter() - started,
    )


def _plan_instances(inputs: JobPlanInputs, plan: ClusterPlan) -> tuple[list[SimInstance], float]:
    """One simulated instance per planned one, at the plan's rate in work units/s (output
    tokens plus prompt tokens at their planned cost), and that cost (capacity-weighted)."""
    w = inputs.workload
    catalog = inputs.catalog or DEFAULT_CATALOG
    costs, weights, steps = [], [], {}
    for p in plan.pools:
        acc = catalog.get(p.accelerator)
        d = deployment(inputs.model, acc, coefficients_or_default(acc, inputs.calibration),
                       p.config)
        costs.append(prompt_token_cost(d, max(p.concurrency, 1), p.config.max_num_batched_tokens,
                                       w.input_len_mean, w.output_len_mean))
        weights.append(p.output_tokens_per_s)
        steps[p.pool] = drain_step_s(d, p.concurrency, w.input_len_mean + w.output_len_mean / 2)
    cost = sum(c * wt for c, wt in zip(costs, weights, strict=True)) / max(sum(weights), 1e-9)
    scale = 1 + cost * w.input_len_mean / w.output_len_mean
    insts = [
        SimInstance(f"{p.pool}/{k}", p.capacity_weight, p.capacity_weight * scale,
                    max(p.concurrency, 1), pool=p.pool, step_s=steps[p.pool])
        for p in plan.pools for k in range(p.config.instances)
    ]
    return insts, cost


def _draw_work(
    w: Workload, rows: int, rng: np.random.Generator, input_sample: Sequence[int] | None,
    output_sigma: float, prompt_cost: float,
) -> RowWork:
    """Row lengths drawn from the input sample (else a lognormal of the workload's mean and
    p95) and a lognormal of outputs with the workload's mean, capped at max_tokens."""
    outputs = capped_lognormal(w.output_len_mean, output_sigma, w.output_max)
    if input_sample:
        return RowWork.resample(rows, rng, np.asarray(input_sample), outputs, prompt_cost)
    in_sigma = lognormal_sigma(w.input_len_mean, w.input_len_p95)
    inputs = capped_lognormal(w.input_len_mean, in_sigma, w.input_max)
    return RowWork.sample(rows, rng, inputs, outputs, prompt_cost)
