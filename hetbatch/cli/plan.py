"""`hetbatch plan`: print the plan for a job file, or for a what-if cluster given by flags."""

from __future__ import annotations

import json
from dataclasses import replace

import click

from hetbatch.cli import options
from hetbatch.errors import UserError
from hetbatch.planner.profile import KV_CACHE_DTYPES, QUANTIZATIONS, load_model_profile
from hetbatch.planner.search import plan_cluster
from hetbatch.planner.types import OBJECTIVES, ClusterPlan, PoolPlan, PoolRequest, Workload
from hetbatch.planning import (
    JobPlanInputs,
    Makespan,
    forecast_makespan,
    job_plan_inputs,
    kv_cache_dtypes,
    load_calibration,
)
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.spec import JobSpec, load_job


@options.command("plan")
@options.job_file(required=False)
@click.option("--model", "model_name", help="Local model folder or a known architecture name.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS),
              help="Weight format (default: the checkpoint's).")
@click.option("--accelerator", help="Accelerator type of the pool, e.g. H100, A100, L4, cpu.")
@click.option("--devices", type=int, help="Devices per node.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes in the pool.")
@click.option("--price", type=float, help="Price per device-hour.")
@click.option("--tp", type=int, help="Pin the tensor-parallel size.")
@click.option("--max-num-seqs", type=int, help="Pin max_num_seqs (default: searched).")
@click.option("--kv-cache-dtype", type=click.Choice([*KV_CACHE_DTYPES, "any"]),
              help="KV cache format; 'any' searches the model's dtype and fp8 "
                   "(default: the job's engine_args, else auto).")
@click.option("--pool", "extra_pools", multiple=True, metavar="ACC:DEVICES[:NODES[:PRICE]]",
              help="Another pool (repeatable), for a heterogeneous what-if.")
@click.option("--input-len", type=float, help="Mean prompt length in tokens.")
@click.option("--input-len-p95", type=float, help="95th percentile prompt length.")
@click.option("--input-len-max", type=int, help="Longest prompt to reserve context for.")
@click.option("--output-len", type=float,
              help="Mean output length in tokens (with a job file: instead of max_tokens).")
@click.option("--output-sigma", type=float, default=0.5, show_default=True,
              help="Lognormal spread of output lengths for the makespan (0: all alike).")
@click.option("--output-len-max", type=int, help="Sampling max_tokens.")
@click.option("--rows", type=int, help="Rows in the dataset (for time and cost estimates).")
@click.option("--objective", type=click.Choice(list(OBJECTIVES)), help="What to optimise.")
@click.option("--deadline", type=float, help="Seconds to finish the rows (objective deadline).")
@options.calibration
@click.option("--sample-rows", type=int, default=2000, show_default=True,
              help="Input rows the job's prompt lengths are measured on.")
@click.option("--top", "top_k", type=int, default=3, show_default=True,
              help="Runners-up shown per pool.")
@options.as_json
def plan_command(job_file: str | None, **opts: object) -> None:
    """Plan instances per accelerator pool: TP/PP, batch limits, expected tokens/s.

    Give a JOB_FILE, or describe a cluster with flags, e.g.
    `hetbatch plan --model meta-llama/Llama-3.1-8B-Instruct --accelerator H100 --devices 8
    --input-len 512 --output-len 256`.
    """
    job = load_job(job_file) if job_file else None
    inputs = _inputs(job, opts)
    if opts.get("calibration"):
        inputs = replace(inputs, calibration=load_calibration(str(opts["calibration"])))
    plan = _plan(inputs, opts)
    makespan = _makespan(job, inputs, plan, opts)
    if opts["as_json"]:
        data = plan.to_dict()
        data["makespan"] = None if makespan is None else makespan.to_dict()
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render(plan, makespan))


def _inputs(job: JobSpec | None, opts: dict[str, object]) -> JobPlanInputs:
    if job is None:
        return _inputs_from_flags(opts)
    sample_rows = int(opts.get("sample_rows") or 2000)  # type: ignore[call-overload]
    inputs = job_plan_inputs(job, sample_rows=sample_rows)
    pins = _pins(opts)
    if pins:
        inputs = replace(inputs, pools=[replace(p, **pins) for p in inputs.pools])
    if opts.get("output_len") is not None:
        out = float(opts["output_len"])  # type: ignore[arg-type]
        inputs = replace(
            inputs, workload=replace(inputs.workload, output_len_mean=out),
            pool_workloads={k: replace(w, output_len_mean=out)
                            for k, w in inputs.pool_workloads.items()},
        )
    return inputs


def _pins(opts: dict[str, object]) -> dict[str, object]:
    """Search restrictions the flags ask for, as PoolRequest fields."""
    pins: dict[str, object] = {}
    if opts.get("tp") is not None:
        pins["tensor_parallel_size"] = opts["tp"]
    if opts.get("max_num_seqs") is not None:
        pins["max_num_seqs"] = opts["max_num_seqs"]
    if opts.get("kv_cache_dtype"):
        pins["kv_cache_dtypes"] = kv_cache_dtypes(opts["kv_cache_dtype"])
    return pins


def _plan(inputs: JobPlanInputs, opts: dict[str, object]) -> ClusterPlan:
    top_k = int(opts["top_k"])  # type: ignore[call-overload]
    if top_k < 0:
        raise UserError("--top must be >= 0")
    return plan_cluster(
        inputs.model, inputs.pools, inputs.workload,
        objective=str(opts.get("objective") or "throughput"),
        deadline_s=_float(opts.get("deadline")),
        catalog=inputs.catalog, calibration=inputs.calibration, top_k=top_k,
        pool_workloads=inputs.pool_workloads,
    )


def _makespan(
    job: JobSpec | None, inputs: JobPlanInputs, plan: ClusterPlan, opts: dict[str, object]
) -> Makespan | None:
    """The job's plan run through the simulator (rows known only)."""
    sigma = float(opts.get("output_sigma") or 0.0)  # type: ignore[arg-type]
    if sigma < 0:
        raise UserError("--output-sigma must be >= 0")
    if job is None:
        return forecast_makespan(inputs, plan, output_sigma=sigma)
    return forecast_makespan(inputs, plan, output_sigma=sigma,
                             scheduler=SchedulerConfig.from_spec(job.scheduler),
                             heartbeat_s=job.scheduler.heartbeat_s)


def _float(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _inputs_from_flags(o: dict[str, object]) -> JobPlanInputs:
    missing = [f"--{k.replace('_', '-')}" for k in ("input_len", "output_len") if o.get(k) is None]
    if not o.get("model_name"):
        missing.insert(0, "--model")
    if not o.get("accelerator") and not o.get("extra_pools"):
        missing.append("--accelerator (or --pool)")
    if missing:
        raise UserError(f"give a JOB_FILE or {', '.join(missing)}")
    model = load_model_profile(str(o["model_name"]), o.get("quantization"))  # type: ignore[arg-type]
    pools: list[PoolRequest] = []
    if o.get("accelerator"):
        if not o.get("devices"):
            raise UserError("--accelerator needs --devices (devices per node)")
        pools.append(PoolRequest(
            name=str(o["accelerator"]), accelerator=str(o["accelerator"]),
            devices_per_node=int(o["devices"]), nodes=int(o["nodes"]),  # type: ignore[call-overload]
            price_per_device_hour=_float(o.get("price")),
        ))
    for spec in o.get("extra_pools") or ():  # type: ignore[attr-defined]
        pools.append(_parse_pool(spec, {p.name for p in pools}))
    pins = _pins(o)
    pools = [replace(p, **pins) for p in pools]
    mean = float(o["input_len"])  # type: ignore[arg-type]
    workload = Workload(
        input_len_mean=mean,
        input_len_p95=_float(o.get("input_len_p95")) or mean,
        output_len_mean=float(o["output_len"]),  # type: ignore[arg-type]
        rows=o.get("rows"),  # type: ignore[arg-type]
        input_len_max=o.get("input_len_max"),  # type: ignore[arg-type]
        output_len_max=o.get("output_len_max"),  # type: ignore[arg-type]
    )
    return JobPlanInputs(model, pools, workload)


def _parse_pool(spec: str, taken: set[str]) -> PoolRequest:
    parts = spec.split(":")
    try:
        if not 2 <= len(parts) <= 4:
            raise ValueError
        name = parts[0]
        unique = name
        while unique in taken:
            unique = f"{unique}'"
        return PoolRequest(
            name=unique, accelerator=name,
            devices_per_node=int(parts[1]), nodes=int(parts[2]) if len(parts) > 2 else 1,
            price_per_device_hour=float(parts[3]) if len(parts) > 3 else None,
        )
    except ValueError:
        raise UserError(f"--pool {spec!r}: expected ACC:DEVICES[:NODES[:PRICE]]") from None


def render(plan: ClusterPlan, makespan: Makespan | None = None) -> str:
    """The plan as a readable table with runners-up and rejected layouts."""
    lines = [_headline(plan)]
    if makespan is not None:
        lines.append(_makespan_line(makespan))
    lines.append("")
    header = ("pool", "accelerator", "nodes", "TP", "PP", "inst", "seqs", "batched", "mem",
              "conc", "out tok/s", "share", "est. time")
    rows = [header, *(_row(p) for p in plan.pools)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    for p in plan.pools:
        lines.extend(_details(p))
    if plan.unused_pools:
        lines.append("")
        lines.append(f"Unused pools: {', '.join(plan.unused_pools)}")
    lines.extend(f"Note: {n}" for n in plan.notes)
    return "\n".join(lines)


def _headline(plan: ClusterPlan) -> str:
    head = (f"Plan for {plan.model} ({plan.quantization}), objective {plan.objective}: "
            f"{plan.output_tokens_per_s:,.0f} output tok/s ({plan.total_tokens_per_s:,.0f} "
            "total)")
    if plan.est_time_s is not None:
        head += f", rows done in ~{_duration(plan.est_time_s)}"
    if plan.est_cost is not None:
        head += f", ~{plan.est_cost:,.2f} at {plan.cost_per_hour:,.2f}/h"
    return head


def _makespan_line(m: Makespan) -> str:
    """The simulated makespan beside the steady-state one."""
    return (f"Makespan of {m.rows:,} rows (simulated): ~{_duration(m.makespan_s)}, "
            f"{_duration(m.low_s)} to {_duration(m.high_s)} over {m.draws} length draws; "
            f"steady-state rate alone: {_duration(m.steady_s)}")


def _row(p: PoolPlan) -> tuple[str, ...]:
    c = p.config
    nodes = f"{p.nodes_used}/{p.nodes}" if p.nodes_used != p.nodes else str(p.nodes)
    return (p.pool, p.accelerator, nodes, str(c.tensor_parallel_size),
            str(c.pipeline_parallel_size), str(c.instances), str(c.max_num_seqs),
            str(c.max_num_batched_tokens), f"{c.gpu_memory_utilization:.2f}", str(p.concurrency),
            f"{p.output_tokens_per_s:,.0f}", f"{p.share:.1%}",
            "-" if p.est_time_s is None else _duration(p.est_time_s))


def _details(p: PoolPlan) -> list[str]:
    kv = f", KV cache {p.config.kv_cache_dtype}" if p.config.kv_cache_dtype != "auto" else ""
    out = ["", f"{p.pool}: {p.bound}-bound, {p.capacity_weight:,.0f} output tok/s per instance"
               f"{kv}"]
    for r in p.runners_up:
        out.append(f"  runner-up {r.config.label()}: {r.why}")
    for layout, (reason, count) in _rejected_layouts(p).items():
        out.append(f"  rejected {layout} ({count} configs): {reason}")
    return out


def _rejected_layouts(p: PoolPlan) -> dict[str, tuple[str, int]]:
    """Per TP/PP layout, how many configs were rejected and the reason of the most permissive."""
    groups: dict[str, list] = {}
    for r in p.rejected:
        key = f"TP={r.config.tensor_parallel_size} PP={r.config.pipeline_parallel_size}"
        groups.setdefault(key, []).append(r)
    out: dict[str, tuple[str, int]] = {}
    for key, rs in groups.items():
        best = min(rs, key=lambda r: (r.config.max_num_seqs, -r.config.gpu_memory_utilization,
                                      r.config.max_num_batched_tokens))
        out[key] = (best.reason, len(rs))
    return out


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    minutes = seconds / 60
    if minutes < 90:
        return f"{minutes:.0f}m"
    hours, mins = divmod(int(minutes), 60)
    return f"{hours}h{mins:02d}m"

