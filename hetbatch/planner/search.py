"""Exhaustive search of deployment configurations, pool by pool, and the cluster plan.

Every combination of tensor parallelism, pipeline parallelism (only where a node cannot hold the
model), max_num_seqs, max_num_batched_tokens and memory fraction is either rejected with a
reason or scored by the throughput model. The grids are small enough (a few hundred points per
pool) that exhaustive search is both fast and easy to explain.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from hetbatch.errors import UserError
from hetbatch.planner.calibration import Calibration, coefficients_or_default
from hetbatch.planner.catalog import DEFAULT_CATALOG, Accelerator, Catalog
from hetbatch.planner.model import (
    Coefficients,
    Deployment,
    estimate_instance,
    kv_capacity,
    memory_fit,
    steady_concurrency,
)
from hetbatch.planner.profile import WEIGHT_BYTES, ModelProfile
from hetbatch.planner.types import (
    OBJECTIVES,
    Candidate,
    ClusterPlan,
    DeployConfig,
    Estimate,
    PoolPlan,
    PoolRequest,
    Rejected,
    Workload,
)

# Up to the batches vLLM runs in practice on large-memory parts (AMD publishes 3,200); vLLM
# itself sets no upper limit, but the sampler's float32 logits grow with it (see the model).
SEQS_GRID: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOKENS_GRID: tuple[int, ...] = (2048, 4096, 8192, 16384)
MEMORY_GRID: tuple[float, ...] = (0.85, 0.90, 0.95)
# Configurations within this share of the best score count as ties; the safest one wins.
TIE_TOLERANCE = 0.01
MAX_PP = 8


@dataclass(frozen=True)
class _Pool:
    """A pool with everything the search needs resolved once."""

    req: PoolRequest
    acc: Accelerator
    coef: Coefficients
    price: float | None


@dataclass(frozen=True)
class _PoolResult:
    pool: _Pool
    feasible: tuple[Candidate, ...]
    rejected: tuple[Rejected, ...]


def plan_cluster(
    model: ModelProfile,
    pools: Sequence[PoolRequest],
    workload: Workload,
    objective: str = "throughput",
    deadline_s: float | None = None,
    catalog: Catalog | None = None,
    calibration: Calibration | None = None,
    top_k: int = 3,
    pool_workloads: Mapping[str, Workload] | None = None,
) -> ClusterPlan:
    """Choose a deployment for every pool of the cluster.

    `pool_workloads`: the rows a pool will really receive when they differ from the job's
    (rows dealt by the context they need: `hetbatch.planner.length_mix`).

    objective: "throughput" (most tokens/s), "cost" (most tokens per dollar; needs prices) or
    "deadline" (the cheapest set of nodes that finishes `workload.rows` within `deadline_s`).
    """
    _check_inputs(pools, workload, objective, deadline_s)
    resolved = [_resolve(p, catalog or DEFAULT_CATALOG, calibration) for p in pools]
    mixes = pool_workloads or {}
    results = [_search_pool(model, rp, mixes.get(rp.req.name, workload), objective)
               for rp in resolved]
    if not any(r.feasible for r in results):
        raise UserError(_fits_nowhere(model, results, workload, catalog or DEFAULT_CATALOG))
    if objective == "deadline":
        assert deadline_s is not None and workload.rows is not None
        units = _deadline_units(results, workload, deadline_s)
    else:
        units = {id(r): _nodes_usable(r) for r in results}
    return _assemble(model, results, units, workload, objective, deadline_s, top_k)


def candidates_for_pool(
    model: ModelProfile, req: PoolRequest, acc: Accelerator, coef: Coefficients,
    workload: Workload, objective: str = "throughput",
) -> tuple[Candidate, ...]:
    """Every feasible configuration of one pool under `coef`, best first (for re-planning a
    pool mid-job with coefficients fitted to what it really does)."""
    return _search_pool(model, _Pool(req, acc, coef, req.price_per_device_hour), workload,
                        objective).feasible


def _check_inputs(
    pools: Sequence[PoolRequest], workload: Workload, objective: str, deadline_s: float | None
) -> None:
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if not pools:
        raise UserError("the cluster has no pools")
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise UserError(f"pool names must be unique: {names}")
    priced = [p.price_per_device_hour is not None for p in pools]
    if objective == "cost" and not all(priced):
        missing = [p.name for p in pools if p.price_per_device_hour is None]
        raise UserError(f"objective 'cost' needs price_per_device_hour on every pool: {missing}")
    if objective == "deadline":
        if deadline_s is None or deadline_s <= 0:
            raise UserError("objective 'deadline' needs a positive deadline_s")
        if not workload.rows:
            raise UserError("objective 'deadline' needs the workload's row count")
        if any(priced) and not all(priced):
            raise UserError("objective 'deadline': give price_per_device_hour on all pools or none")


def _resolve(req: PoolRequest, catalog: Catalog, calibration: Calibration | None) -> _Pool:
    acc = catalog.get(req.accelerator)
    return _Pool(req, acc, coefficients_or_default(acc, calibration), req.price_per_device_hour)


def deployment(
    model: ModelProfile, acc: Accelerator, coef: Coefficients, cfg: DeployConfig
) -> Deployment:
    """The instance a chosen configuration makes of `model`: its KV format and parallelism."""
    return Deployment(model.with_kv_cache_dtype(cfg.kv_cache_dtype), acc, coef,
                      cfg.tensor_parallel_size, cfg.pipeline_parallel_size)


def max_model_len(model: ModelProfile, workload: Workload) -> int:
    """Context to reserve per sequence: the longest prompt plus the longest output, capped at
    what the model supports (longer rows then fail alone, as the design asks)."""
    return int(min(model.max_position, workload.input_max + workload.output_max))


def quantization_problem(model: ModelProfile, acc: Accelerator) -> str | None:
    """Why this weight format cannot run on this accelerator, or None."""
    q = model.quantization
    if q == "fp8" and not acc.fp8:
        return f"FP8 weights need FP8 hardware, which {acc.name} lacks; use bf16, int8 or int4"
    if q == "int8" and not acc.int8_tops:
        return f"INT8 weights need INT8 tensor cores, which {acc.name} lacks; use int4 or fp16"
    return None


def _structures(model: ModelProfile, pool: _Pool) -> list[tuple[int, int, str | None]]:
    """(tp, pp, reason-if-impossible) for every parallel layout worth a look."""
    req = pool.req
    dpn = req.devices_per_node
    tps = [t for t in range(1, dpn + 1) if dpn % t == 0]
    if req.instances_per_node is not None:
        tps = [t for t in tps if t * req.instances_per_node <= dpn]
    if req.tensor_parallel_size is not None:
        tps = [req.tensor_parallel_size]
    out: list[tuple[int, int, str | None]] = []
    for tp in tps:
        out.append((tp, 1, _layout_problem(model, tp, dpn)))
    return out


def _layout_problem(model: ModelProfile, tp: int, dpn: int) -> str | None:
    if tp > dpn:
        return f"TP={tp} needs more than the {dpn} devices of a node"
    if model.heads % tp:
        return f"TP={tp} does not divide the {model.heads} attention heads"
    if model.kv_heads % tp and tp % model.kv_heads:
        return f"TP={tp} and the {model.kv_heads} KV heads do not divide one another"
    return None


def _instances_per_node(pool: _Pool, tp: int, pp: int) -> int:
    if pp > 1:
        return 1
    return pool.req.instances_per_node or pool.req.devices_per_node // tp


def _search_pool(
    model: ModelProfile, pool: _Pool, workload: Workload, objective: str
) -> _PoolResult:
    feasible: list[Candidate] = []
    rejected: list[Rejected] = []
    structures = _structures(model, pool)
    for tp, pp, problem in structures:
        _search_layout(model, pool, workload, objective, tp, pp, problem, feasible, rejected)
    pinned = pool.req.tensor_parallel_size
    if not feasible and pool.req.nodes > 1 and pinned in (None, pool.req.devices_per_node):
        _search_pipeline(model, pool, workload, objective, feasible, rejected)
    feasible.sort(key=lambda c: (-c.score, _safety_key(c.config)))
    return _PoolResult(pool, tuple(feasible), tuple(rejected))


def _search_pipeline(
    model: ModelProfile, pool: _Pool, workload: Workload, objective: str,
    feasible: list[Candidate], rejected: list[Rejected],
) -> None:
    """The model does not fit one node: split its layers over `pp` nodes, the fewest that work
    first, since every extra stage costs a bubble and an inter-node hop."""
    tp = pool.req.devices_per_node
    problem = _layout_problem(model, tp, tp)
    for pp in range(2, min(pool.req.nodes, MAX_PP) + 1):
        before = len(feasible)
        _search_layout(model, pool, workload, objective, tp, pp, problem, feasible, rejected)
        if len(feasible) > before:
            return


def _search_layout(
    model: ModelProfile, pool: _Pool, workload: Workload, objective: str, tp: int, pp: int,
    problem: str | None, feasible: list[Candidate], rejected: list[Rejected],
) -> None:
    problem = problem or quantization_problem(model, pool.acc)
    ipn = _instances_per_node(pool, tp, pp)
    instances = (pool.req.nodes // pp) * ipn
    if problem is None and instances < 1:
        problem = f"PP={pp} needs more than the pool's {pool.req.nodes} nodes"
    seqs_grid = (pool.req.max_num_seqs,) if pool.req.max_num_seqs else SEQS_GRID
    tokens_grid = ((pool.req.max_num_batched_tokens,) if pool.req.max_num_batched_tokens
                   else TOKENS_GRID)
    mem_grid = ((pool.req.gpu_memory_utilization,) if pool.req.gpu_memory_utilization
                else MEMORY_GRID)
    for kv in pool.req.kv_cache_dtypes:
        for seqs in seqs_grid:
            for tokens in tokens_grid:
                for mem in mem_grid:
                    cfg = DeployConfig(tp, pp, ipn, instances, seqs, tokens, mem, kv)
                    reason = problem or _evaluate(model, pool, workload, objective, cfg, feasible)
                    if reason:
                        rejected.append(Rejected(cfg, reason))


def _evaluate(
    model: ModelProfile, pool: _Pool, workload: Workload, objective: str, cfg: DeployConfig,
    feasible: list[Candidate],
) -> str | None:
    """Score one configuration into `feasible`, or return why it cannot run."""
    if cfg.max_num_batched_tokens < cfg.max_num_seqs:
        return "max_num_batched_tokens is below max_num_seqs (vLLM refuses it)"
    d = deployment(model, pool.acc, pool.coef, cfg)
    fit = memory_fit(d, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                     cfg.gpu_memory_utilization)
    if fit.kv_tokens < 0:
        return (
            f"weights {fit.weights_gib:.1f} GiB + activations {fit.activation_gib:.1f} GiB + "
            f"reserve {fit.reserve_gib:.1f} GiB exceed the {fit.usable_gib:.1f} GiB usable "
            "per device"
        )
    need = max_model_len(model, workload)
    full = kv_capacity(d, fit, need)
    if full < need:
        return f"KV cache holds {full} tokens, fewer than max_model_len {need}"
    footprint = workload.input_len_mean + workload.output_len_mean / 2
    batch = steady_concurrency(kv_capacity(d, fit, footprint), cfg.max_num_seqs,
                               workload.input_len_mean, workload.output_len_mean)
    if batch < 1:
        return "KV cache cannot hold one average sequence"
    est = estimate_instance(d, batch, cfg.max_num_batched_tokens, workload.input_len_mean,
                            workload.output_len_mean)
    per = Estimate(est.output_tokens_per_s, est.total_tokens_per_s, batch, full, est.bound)
    feasible.append(Candidate(cfg, per, _score(objective, pool, cfg, per)))
    return None


def _score(objective: str, pool: _Pool, cfg: DeployConfig, per: Estimate) -> float:
    """Throughput: the pool's output tokens/s. Cost and deadline: output tokens per dollar
    (per device-hour when no prices are given)."""
    if objective == "throughput":
        return per.output_tokens_per_s * cfg.instances
    price = pool.price if pool.price is not None else 1.0
    return per.output_tokens_per_s * 3600 / (cfg.devices_per_instance * max(price, 1e-9))


def _safety_key(cfg: DeployConfig) -> tuple[float, ...]:
    """Among near-equal scores prefer the model's own KV precision (lossless), then less memory
    pressure, fewer sequences, smaller steps."""
    return (cfg.kv_cache_dtype != "auto", cfg.gpu_memory_utilization, cfg.max_num_seqs,
            cfg.max_num_batched_tokens, cfg.tensor_parallel_size, cfg.pipeline_parallel_size)


def choose(feasible: Sequence[Candidate]) -> Candidate:
    """The safest configuration among those within TIE_TOLERANCE of the best score."""
    best = max(c.score for c in feasible)
    near = [c for c in feasible if c.score >= best * (1 - TIE_TOLERANCE)]
    return min(near, key=lambda c: _safety_key(c.config))


def runners_up(
    feasible: Sequence[Candidate], chosen: Candidate, top_k: int, metric: str = "throughput"
) -> list[Candidate]:
    """The best alternatives, one per parallel layout first so that they teach something."""
    others = [c for c in feasible if c is not chosen]
    seen = {(chosen.config.tensor_parallel_size, chosen.config.pipeline_parallel_size)}
    picked: list[Candidate] = []
    for c in others:
        layout = (c.config.tensor_parallel_size, c.config.pipeline_parallel_size)
        if layout not in seen and len(picked) < top_k:
            seen.add(layout)
            picked.append(c)
    for c in others:
        if len(picked) >= top_k:
            break
        if c not in picked:
            picked.append(c)
    return [_explain(c, chosen, metric) for c in picked[:top_k]]


def _explain(c: Candidate, chosen: Candidate, what: str) -> Candidate:
    gap = 1 - c.score / chosen.score if chosen.score else 0.0
    if gap <= TIE_TOLERANCE:
        why = f"within {TIE_TOLERANCE:.0%} of the best; the chosen one uses less memory or batch"
    else:
        why = (
            f"{gap:.0%} lower estimated {what} ({c.per_instance.bound}-bound, "
            f"{c.per_instance.concurrency} sequences at once)"
        )
    return Candidate(c.config, c.per_instance, c.score, why)


def _deadline_units(
    results: Sequence[_PoolResult], workload: Workload, deadline_s: float
) -> dict[int, int]:
    """Nodes to use per pool: node groups in order of cost per row until their rows/s meet the
    deadline. Cheaper-per-row groups first is optimal for the average cost per row."""
    assert workload.rows is not None
    groups: list[tuple[float, int, _PoolResult, float]] = []
    for order, r in enumerate(results):
        if not r.feasible:
            continue
        c = choose(r.feasible)
        pp = c.config.pipeline_parallel_size
        per_group = c.config.instances_per_node  # instances on one node, or on one PP group
        rate = c.per_instance.output_tokens_per_s * per_group / workload.output_len_mean
        cost = _price(r.pool) * c.config.devices_per_instance * per_group
        for _ in range(r.pool.req.nodes // pp):
            groups.append((cost / rate, order, r, rate))
    groups.sort(key=lambda g: (g[0], g[1]))
    needed = workload.rows / deadline_s
    total, used = 0.0, {id(r): 0 for r in results}
    for _, _, r, rate in groups:
        if total >= needed:
            break
        total += rate
        used[id(r)] += choose(r.feasible).config.pipeline_parallel_size
    if total < needed:
        full = workload.rows / total if total else float("inf")
        raise UserError(
            f"no part of the cluster finishes {workload.rows} rows in {deadline_s:.0f} s: the "
            f"whole cluster needs about {full:.0f} s; add nodes or relax the deadline"
        )
    return used


def _price(pool: _Pool) -> float:
    return pool.price if pool.price is not None else 1.0


def _assemble(
    model: ModelProfile, results: Sequence[_PoolResult], nodes_used: dict[int, int],
    workload: Workload, objective: str, deadline_s: float | None, top_k: int,
) -> ClusterPlan:
    chosen = {id(r): choose(r.feasible) for r in results if nodes_used[id(r)]}
    rates = {k: _pool_rate(c, nodes_used[k]) for k, c in chosen.items()}
    cluster_out = sum(rates.values())
    rows_per_s = cluster_out / workload.output_len_mean
    est_time = workload.rows / rows_per_s if workload.rows is not None and rows_per_s else None
    plans: list[PoolPlan] = []
    unused: list[str] = []
    notes: list[str] = _notes(model, workload, results)
    for r in results:
        if id(r) not in chosen:
            unused.append(r.pool.req.name)
            if not r.feasible:
                notes.append(f"pool {r.pool.req.name!r} cannot run the model: "
                             f"{_common_reason(r.rejected)}")
            continue
        plans.append(_pool_plan(model, r, chosen[id(r)], nodes_used[id(r)], rates[id(r)],
                                cluster_out, est_time, workload, top_k, objective))
        if r.pool.acc.kind == "cpu":
            notes.append(_cpu_note(model, r.pool, chosen[id(r)].config))
    priced = [p.cost_per_hour for p in plans]
    cost_h = sum(c for c in priced if c is not None) if all(c is not None for c in priced) else None
    return ClusterPlan(
        model=model.name, quantization=model.quantization, objective=objective,
        pools=tuple(plans), output_tokens_per_s=cluster_out,
        total_tokens_per_s=sum(p.total_tokens_per_s for p in plans), est_time_s=est_time,
        cost_per_hour=cost_h,
        est_cost=cost_h * est_time / 3600 if cost_h is not None and est_time is not None else None,
        deadline_s=deadline_s, unused_pools=tuple(unused), notes=tuple(notes),
    )


def _nodes_usable(r: _PoolResult) -> int:
    """All nodes, less those left over when PP groups do not divide them."""
    if not r.feasible:
        return 0
    pp = choose(r.feasible).config.pipeline_parallel_size
    return (r.pool.req.nodes // pp) * pp


def _pool_rate(c: Candidate, nodes: int) -> float:
    instances = _instances_on(c.config, nodes)
    return c.per_instance.output_tokens_per_s * instances


def _instances_on(cfg: DeployConfig, nodes: int) -> int:
    return (nodes // cfg.pipeline_parallel_size) * cfg.instances_per_node


def _pool_plan(
    model: ModelProfile, r: _PoolResult, c: Candidate, nodes: int, rate: float,
    cluster_out: float, est_time: float | None, workload: Workload, top_k: int,
    objective: str,
) -> PoolPlan:
    cfg = c.config
    instances = _instances_on(cfg, nodes)
    if instances != cfg.instances:
        cfg = replace(cfg, instances=instances)
    price = r.pool.price
    devices = instances * cfg.devices_per_instance
    ratio = (workload.input_len_mean + workload.output_len_mean) / workload.output_len_mean
    return PoolPlan(
        pool=r.pool.req.name, accelerator=r.pool.acc.name, nodes=r.pool.req.nodes,
        nodes_used=nodes, devices_per_node=r.pool.req.devices_per_node, config=cfg,
        engine_args=engine_args(model, r.pool.acc, cfg, workload),
        output_tokens_per_s=rate, total_tokens_per_s=rate * ratio,
        capacity_weight=c.per_instance.output_tokens_per_s,
        share=rate / cluster_out if cluster_out else 0.0, est_time_s=est_time,
        cost_per_hour=None if price is None else price * devices,
        runners_up=tuple(runners_up(r.feasible, c, top_k, _metric(objective))),
        rejected=r.rejected,
        concurrency=c.per_instance.concurrency, bound=c.per_instance.bound,
    )


def _metric(objective: str) -> str:
    return "throughput" if objective == "throughput" else "tokens per dollar"


def engine_args(
    model: ModelProfile, acc: Accelerator, cfg: DeployConfig, workload: Workload
) -> dict[str, object]:
    """vLLM EngineArgs for one instance of the pool."""
    args: dict[str, object] = {
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "max_model_len": max_model_len(model, workload),
    }
    if cfg.kv_cache_dtype != "auto":
        args["kv_cache_dtype"] = cfg.kv_cache_dtype
    if model.quantization == "fp8" and model.checkpoint_format != "fp8":
        args["quantization"] = "fp8"  # vLLM quantizes a 16-bit checkpoint to FP8 on load
    if not acc.bf16 and model.quantization in ("bf16", "fp32"):
        args["dtype"] = "float16"  # no bf16 on this card; vLLM refuses bf16 there
    return args


def _notes(model: ModelProfile, workload: Workload, results: Sequence[_PoolResult]) -> list[str]:
    notes: list[str] = []
    if workload.input_max + workload.output_max > model.max_position:
        notes.append(
            f"prompt+output up to {workload.input_max + workload.output_max} tokens exceeds the "
            f"model's {model.max_position}; longer rows will get an error"
        )
    if model.quantization in ("int4", "int8") and model.checkpoint_format != model.quantization:
        notes.append(f"{model.quantization} needs a checkpoint quantized to it (AWQ/GPTQ/W8A8)")
    return notes


def _cpu_note(model: ModelProfile, pool: _Pool, cfg: DeployConfig) -> str:
    """vLLM's CPU backend sizes its KV cache from an environment variable, not the fraction."""
    d = deployment(model, pool.acc, pool.coef, cfg)
    fit = memory_fit(d, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                     cfg.gpu_memory_utilization)
    return (f"pool {pool.req.name!r} runs on CPU: set VLLM_CPU_KVCACHE_SPACE="
            f"{max(1, int(fit.kv_gib))} (GiB) for the KV cache this plan assumes")


def _common_reason(rejected: Sequence[Rejected]) -> str:
    """The reason of the most permissive rejected configuration (smallest batch, most memory)."""
    if not rejected:
        return "no configuration"
    best = min(rejected, key=lambda r: (r.config.max_num_seqs, r.config.max_num_batched_tokens,
                                        -r.config.gpu_memory_utilization,
                                        -r.config.tensor_parallel_size))
    return f"{best.reason} (TP={best.config.tensor_parallel_size})"


def _fits_nowhere(
    model: ModelProfile, results: Sequence[_PoolResult], workload: Workload, catalog: Catalog
) -> str:
    """One line: why no pool can run the model and what would make it fit."""
    gib = model.weight_bytes / 2**30
    why = "; ".join(f"{r.pool.req.name} ({r.pool.acc.name} x{r.pool.req.devices_per_node}): "
                    f"{_common_reason(r.rejected)}" for r in results)
    hints = _fit_hints(model, results, workload, catalog)
    tail = f" It would fit with: {'; '.join(hints)}." if hints else ""
    return (f"{model.name} ({model.quantization}, {gib:.1f} GiB of weights) fits in no pool: "
            f"{why}.{tail}")


def _fit_hints(
    model: ModelProfile, results: Sequence[_PoolResult], workload: Workload, catalog: Catalog
) -> list[str]:
    hints: list[str] = []
    first = results[0].pool
    for devices in (2, 4, 8, 16):
        if devices > first.req.devices_per_node and _fits(model, first.acc, devices, workload):
            hints.append(f"{devices} x {first.acc.name} per node (TP={devices})")
            break
    dpn = max(r.pool.req.devices_per_node for r in results)
    larger = [a for a in catalog.accelerators if a.kind != "cpu" and a.memory_gib >
              first.acc.memory_gib and _fits(model, a, dpn, workload)]
    larger.sort(key=lambda a: (a.memory_gib, a.name))
    if larger:
        hints.append(f"a larger card: {', '.join(a.name for a in larger[:3])} (x{dpn} per node)")
    for q in ("fp8", "int8", "int4"):
        if WEIGHT_BYTES[q] >= model.weight_bytes_per_param:
            continue
        smaller = replace(model, quantization=q)
        ok = [r.pool for r in results if quantization_problem(smaller, r.pool.acc) is None
              and _fits(smaller, r.pool.acc, r.pool.req.devices_per_node, workload)]
        if ok:
            hints.append(f"--quantization {q} ({smaller.weight_bytes / 2**30:.1f} GiB of weights) "
                         f"on {ok[0].req.name}")
            break
    return hints


def _fits(model: ModelProfile, acc: Accelerator, devices: int, workload: Workload) -> bool:
    """Whether any TP dividing `devices` holds the model and one full-length sequence."""
    for tp in (t for t in range(1, devices + 1) if devices % t == 0):
        if _layout_problem(model, tp, devices):
            continue
        d = Deployment.uncalibrated(model, acc, tp)
        fit = memory_fit(d, SEQS_GRID[0], TOKENS_GRID[0], MEMORY_GRID[-1])
        need = max_model_len(model, workload)
        if kv_capacity(d, fit, need) >= need:
            return True
    return False
