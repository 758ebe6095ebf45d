"""`hetbatch simulate JOB`: run a job file's cluster in the simulator, with faults on demand."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import click
import numpy as np

from hetbatch.cli import options
from hetbatch.engines.simulated import delivered_speed as _sim_engine_speed
from hetbatch.engines.simulated import step_seconds
from hetbatch.errors import UserError
from hetbatch.io.prefix_order import PrefixOrder, resolve_window, sampled_keys
from hetbatch.io.sample import read_sample
from hetbatch.layout import InstanceSpec, instance_layout
from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.scheduler.policies import POLICIES, make_scheduler
from hetbatch.sim.prefix_cache import DEFAULT_CACHE_TOKENS, PrefixProfile, cache_rows
from hetbatch.sim.simulation import SimConfig, SimInstance, SimResult, poll_interval, simulate
from hetbatch.sim.workload import LengthDist, RowWork
from hetbatch.spec import JobSpec, load_job


def _pool_speeds(
    job: JobSpec, calibration: str | None = None
) -> dict[str, tuple[float, int]]:
    """Per pool: (output tokens/s per instance at a full batch, max_num_seqs)."""
    planned = _planner_speeds(job, calibration)
    out = {}
    for pool in job.cluster.pools:
        sim = pool.sim or job.engine.sim
        if job.engine.kind == "sim":
            out[pool.name] = (_sim_engine_speed(sim.tokens_per_s, sim.max_num_seqs,
                                                _max_tokens(job)), sim.max_num_seqs)
        elif pool.capacity_weight is not None:
            out[pool.name] = (pool.capacity_weight, sim.max_num_seqs)
        elif pool.name in planned:
            out[pool.name] = planned[pool.name]
        else:
            raise UserError(
                f"pool {pool.name!r}: no speed known; give capacity_weight or sim.tokens_per_s"
            )
    return out


def _max_tokens(job: JobSpec) -> int:
    return max(int(job.sampling.get("max_tokens") or 16), 1)


def _planner_speeds(
    job: JobSpec, calibration: str | None = None
) -> dict[str, tuple[float, int]]:
    """Per-instance speeds the planner expects: from the job's own plan with a calibration
    file, else from the catalog's uncalibrated defaults on a generic workload."""
    if job.engine.kind == "sim" or all(p.capacity_weight for p in job.cluster.pools):
        return {}
    if calibration is not None:
        from hetbatch.planning import load_calibration, plan_job

        plan = plan_job(job, calibration=load_calibration(calibration), top_k=0)
        return {p.pool: (p.capacity_weight, p.config.max_num_seqs) for p in plan.pools}
    from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster

    try:
        model = load_model_profile(job.model.path)
        pools = [
            PoolRequest(p.name, p.accelerator, p.devices_per_node, p.nodes,
                        tensor_parallel_size=p.tensor_parallel_size)
            for p in job.cluster.pools
        ]
        out_len = float(job.sampling.get("max_tokens", 256)) / 2
        plan = plan_cluster(model, pools, Workload(512, 1024, max(out_len, 1.0)), top_k=0)
    except UserError:
        return {}
    return {p.pool: (p.capacity_weight, p.config.max_num_seqs) for p in plan.pools}


def _prefill_cost(job: JobSpec) -> float:
    """Work per prompt token, in output tokens. The simulated engine ignores prompts, and a
    planned speed already prices prefill in (it is output tokens/s of a whole prefill+decode
    cycle), so only a bare capacity_weight leaves prompts to be charged on top."""
    if job.engine.kind == "sim" or not all(p.capacity_weight for p in job.cluster.pools):
        return 0.0
    return 0.05


# Work per prompt token (in output tokens) when planned speeds are split into prompt and output
# work to price a prefix cache: the figure a bare capacity_weight is charged.
PLANNED_PREFILL = 0.05


def _input_lengths(job: JobSpec, sample: int) -> tuple[np.ndarray, int] | None:
    """Prompt lengths (bytes / 4) of the first rows of the job's input, and its row count."""
    column = job.input.prompt_column or job.input.messages_column
    try:
        from hetbatch.io.parquet import open_dataset, read_rows

        ds = open_dataset(job.input.path, [column])
        table = read_rows(ds, 0, min(ds.num_rows, sample), [column])
    except Exception:
        return None
    values = table.column(column).to_pylist()
    lens = [max(len(str(v).encode()) // 4, 1) for v in values if v is not None]
    return (np.asarray(lens), ds.num_rows) if lens else None


def _parse_at(items: tuple[str, ...], sep: str, what: str, known: set[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, value = item.partition(sep)
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{what} {item!r}: expected INSTANCE{sep}NUMBER") from None
        if name not in known:
            raise UserError(f"{what} {item!r}: no instance {name!r} (known: {_few(known)})")
        out[name] = number
    return out


def _few(names: set[str]) -> str:
    s = sorted(names)
    return ", ".join(s[:6]) + (", ..." if len(s) > 6 else "")


def build_instances(
    job: JobSpec, lose=(), join=(), slow=(), calibration: str | None = None
) -> list[SimInstance]:
    layout: list[InstanceSpec] = instance_layout(job)
    speeds = _pool_speeds(job, calibration)
    known = {i.instance_id for i in layout}
    lost = _parse_at(lose, "@", "--lose", known)
    late = _parse_at(join, "@", "--join", known)
    factor = _parse_at(slow, "=", "--slow", known)
    out = []
    for i in layout:
        speed, seqs = speeds[i.pool]
        out.append(SimInstance(i.instance_id, speed, speed, seqs, pool=i.pool))
    return [
        replace(s, lost_at=lost.get(s.instance_id), join_at=late.get(s.instance_id, 0.0),
                speed=s.speed * factor.get(s.instance_id, 1.0))
        for s in out
    ]


def render(result: SimResult) -> str:
    lines = [
        f"makespan {result.makespan:,.1f} s   throughput {result.rows_per_s:,.2f} rows/s, "
        f"{result.work_per_s:,.0f} tokens/s",
        f"lower bound {result.lower_bound:,.1f} s   efficiency {result.efficiency:.3f}",
        "",
        f"{'instance':24s}{'rows':>10s}{'units':>7s}{'busy s':>11s}{'idle s':>11s}",
    ]
    for k, v in result.instances.items():
        lines.append(f"{k:24s}{v.rows:>10,d}{v.units:>7d}{v.busy_s:>11,.1f}{v.idle_s:>11,.1f}")
    return "\n".join(lines)


def gantt(result: SimResult, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--gantt needs matplotlib (pip install 'hetbatch[dev]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.instances)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.3 * len(names)))
    for a in result.assignments:
        ax.barh(names.index(a.instance), a.end - a.start, left=a.start, height=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predict(
    job: JobSpec,
    *,
    calibration: str | None = None,
    lose: tuple[str, ...] = (),
    join: tuple[str, ...] = (),
    slow: tuple[str, ...] = (),
    **workload: Any,
) -> SimResult:
    """The job's simulated run, as `hetbatch simulate` prints it; also what benchmarks call.
    `workload`: the keywords of `simulate_job`."""
    insts = build_instances(job, lose, join, slow, calibration)
    return simulate_job(job, insts, **workload)


def simulate_job(
    job: JobSpec,
    insts: list[SimInstance],
    *,
    policy: str = "hetbatch",
    seed: int = 0,
    rows: int | None = None,
    input_len: float = 512,
    output_len: float | None = None,
    output_sigma: float = 0.5,
    tail: float = 0.0,
    cache_tokens: float = DEFAULT_CACHE_TOKENS,
) -> SimResult:
    """The job's rows run on `insts` by the scheduler of `policy`.

    Output lengths are capped at sampling.max_tokens as an engine caps them; the simulated
    engine always generates exactly max_tokens, so its jobs use that length.
    """
    rng = np.random.default_rng(seed)
    sample = _input_lengths(job, 10_000)
    rows = rows or (sample[1] if sample else 100_000)
    if rows < 1:
        raise UserError("--rows must be >= 1")
    cap = _max_tokens(job)
    if job.engine.kind == "sim":
        output_len, output_sigma = float(cap), 0.0
    out_med = output_len or max(cap / 2, 1.0)
    outputs = LengthDist(out_med, sigma=output_sigma, tail_frac=tail, maximum=cap)
    prefill = _prefill_cost(job)
    window, profile = _prefix_profile(job, rows)
    if profile is not None and sample is not None:
        # Prompts cost what the prefix cache leaves to prefill. Planned speeds price a prompt
        # of the sample's mean length in; charge prompts apart instead, at the same total.
        if prefill == 0.0:
            prefill = PLANNED_PREFILL
            scale = 1 + prefill * float(np.mean(sample[0])) / out_med
            insts[:] = [replace(i, speed=i.speed * scale, planned_weight=i.planned_weight * scale)
                        for i in insts]
        lens = rng.choice(np.asarray(sample[0]), size=rows, replace=True)
        held = cache_rows(cache_tokens, float(np.mean(sample[0])), out_med)
        work = RowWork(profile.cached_prompt(lens, rng, window, held),
                       outputs.sample(rng, rows), prefill)
    else:
        work = (RowWork.resample(rows, rng, sample[0], outputs, prefill) if sample is not None
                else RowWork.sample(rows, rng, LengthDist(input_len), outputs, prefill))
    bounds = None
    if window is None and (known := _known_max_tokens(job, rows)) is not None:
        # Each row capped at its own max_tokens (the simulated engine writes exactly that);
        # the scheduler deals by the job's bounds, as `hetbatch run` does.
        inputs = (rng.choice(np.asarray(sample[0]), size=rows, replace=True)
                  if sample is not None else LengthDist(input_len).sample(rng, rows))
        outs = known if job.engine.kind == "sim" else np.minimum(
            replace(outputs, maximum=None).sample(rng, rows), known)
        work = RowWork(inputs, outs, prefill, needs=inputs + known)
        mean_prompt = round(float(np.mean(sample[0]))) if sample is not None else 0
        if job.scheduler.longest_first:
            bounds = RowBounds.from_rows(known + mean_prompt)
    config = replace(SchedulerConfig.from_spec(job.scheduler), follow_on=window is not None)
    boundaries = PrefixOrder(window, rows).boundaries() if window is not None else ()
    sched = make_scheduler(policy, rows, config, boundaries=boundaries, bounds=bounds)
    sim_cfg = SimConfig(heartbeat_s=job.scheduler.heartbeat_s, poll_s=_step_s(job, insts))
    result = simulate(sched, insts, work, sim_cfg)
    if not result.completed:
        raise UserError("the simulated job never finished: every instance was lost")
    return result


def _known_max_tokens(job: JobSpec, rows: int) -> np.ndarray | None:
    """Each row's max_tokens from the job's per-row column (Parquet input of `rows` rows);
    else None."""
    column = job.row_overrides.max_tokens
    if column is None or job.input.format != "parquet":
        return None
    try:
        from hetbatch.io.parquet import open_dataset
        from hetbatch.io.row_bounds import read_max_tokens

        ds = open_dataset(job.input.path, [column], job.input.storage_options)
        if ds.num_rows != rows:
            return None
        return read_max_tokens(ds, column, _max_tokens(job))
    except (OSError, UserError, ValueError):
        return None


def _prefix_profile(job: JobSpec, rows: int) -> tuple[int | None, PrefixProfile | None]:
    """Prefix order's window for the job (as `hetbatch run` would resolve it) and the shared
    prefixes its input's sample shows; (None, None) when the input cannot be read. The
    simulated engine ignores prompts, so its jobs gain nothing from a prefix cache."""
    try:
        sample = read_sample(job)
    except Exception:
        return None, None
    window = resolve_window(job, None, sample)
    if job.engine.kind == "sim":
        return window, None
    return window, PrefixProfile.from_keys(sampled_keys(job, sample), rows)


def _step_s(job: JobSpec, insts: list[SimInstance]) -> float:
    """How often an instance re-checks whether it wants another unit (`poll_interval`)."""
    if job.engine.kind == "sim":
        steps = []
        for pool in job.cluster.pools:
            sim = pool.sim or job.engine.sim
            steps.append(step_seconds(sim.tokens_per_s, sim.max_num_seqs))
    else:
        steps = [i.max_num_seqs / i.speed for i in insts]
    return poll_interval(steps)


@options.command("simulate")
@options.job_file()
@click.option("--policy", type=click.Choice(POLICIES), default="hetbatch", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--rows", type=int, help="Rows to simulate (default: the input's, else 100,000).")
@click.option("--input-len", type=float, default=512, show_default=True,
              help="Median prompt tokens when the input cannot be read.")
@click.option("--output-len", type=float, help="Median output tokens (default: max_tokens / 2).")
@click.option("--output-sigma", type=float, default=0.5, show_default=True,
              help="Lognormal spread of output lengths; 0 makes every row --output-len.")
@click.option("--tail", type=float, default=0.0, help="Fraction of rows 20x the median output.")
@click.option("--cache-tokens", type=float, default=DEFAULT_CACHE_TOKENS, show_default=True,
              help="KV tokens an instance's prefix cache holds (rows sharing a prompt prefix).")
@options.calibration
@click.option("--lose", multiple=True, metavar="INSTANCE@T", help="Instance lost at time T.")
@click.option("--join", multiple=True, metavar="INSTANCE@T", help="Instance joins at time T.")
@click.option("--slow", multiple=True, metavar="INSTANCE=FACTOR", help="Actual = planned x F.")
@options.as_json
@click.option("--gantt", "gantt_path", type=click.Path(dir_okay=False), help="Write a PNG.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the HTML report of the simulated run (as `hetbatch report` does).")
def simulate_command(
    job_file: str, as_json: bool, gantt_path: str | None, report_path: str | None, **o
) -> None:
    """Simulate JOB_FILE's cluster and scheduler: makespan, throughput, busy/idle per instance."""
    job = load_job(job_file)
    insts = build_instances(job, o.pop("lose"), o.pop("join"), o.pop("slow"),
                            o.pop("calibration"))
    result = simulate_job(job, insts, **o)
    if report_path:
        from hetbatch.report.build import write_report
        from hetbatch.report.simulated import from_simulation

        write_report(from_simulation(result, insts, job.output.path), report_path)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else render(result))
    if gantt_path:
        gantt(result, gantt_path)
