"""Re-planning one pool mid-job from what its instances really do.

A plan is only as good as its coefficients. When a pool's measured output tokens/s per instance
is off what its coefficients predict for the operating point it ran at by more than
`threshold`, the accelerator's coefficients are fitted again by the least squares `hetbatch
profile` uses (`fit_accelerator`), with the live figure as the measurement, and the pool is
searched again under them. If another configuration of the same instances (same TP, PP and
instances per node; what changes is what each engine runs with: max_num_seqs,
max_num_batched_tokens, memory fraction, KV format) beats the current one by `margin` under the
new coefficients, the pool should be restarted in it.

The fit starts from the accelerator's datasheet defaults, as `hetbatch profile` does without a
base: the coefficients the plan was made with are the ones the measurement has just
discredited. Pure: the coordinator and the simulator call `decide_replan` with the figures
they hold, and act on its answer at their own edges.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hetbatch.planner.calibration import Measurement, fit_accelerator
from hetbatch.planner.catalog import DEFAULT_CATALOG, Accelerator, Catalog
from hetbatch.planner.model import Coefficients, default_coefficients, estimate_instance
from hetbatch.planner.profile import ModelProfile
from hetbatch.planner.search import candidates_for_pool, choose, deployment, engine_args
from hetbatch.planner.types import DeployConfig, PoolPlan, PoolRequest, Workload

# A re-fit whose coefficients miss the live figure by more than this is not acted on (one
# figure cannot always pin the roofline's choice between compute and bandwidth).
FIT_TOLERANCE = 0.1


@dataclass(frozen=True)
class ReplanPolicy:
    """When a pool is re-planned.

    threshold: relative gap between measured and predicted tokens/s that calls for a re-fit.
    margin: relative gain a new configuration must promise under the re-fitted coefficients.
    min_units / min_active_s: what each measured instance must have done before its figure
    counts (a ramp-up is not a speed).
    A pool is re-planned at most once per run: a restart costs an engine start-up, and the
    figures after it would mix the two configurations.
    """

    threshold: float = 0.25
    margin: float = 0.15
    min_units: int = 3
    min_active_s: float = 10.0


@dataclass(frozen=True)
class PoolMeasurement:
    """What a pool's instances did so far, per instance on average."""

    pool: str
    instances: int
    output_tokens_per_s: float
    input_len: float  # mean prompt tokens per row
    output_len: float  # mean completion tokens per row
    concurrency: float | None = None  # mean requests running in the engine, when reported


@dataclass(frozen=True)
class PlanContext:
    """What the planner was given for the job; enough to search one pool again."""

    model: ModelProfile
    pools: Mapping[str, PoolRequest]
    workload: Workload
    objective: str = "throughput"
    catalog: Catalog | None = None
    coefficients: Mapping[str, Coefficients] | None = None  # by pool: what its plan used

    def accelerator(self, pool: str) -> Accelerator:
        return (self.catalog or DEFAULT_CATALOG).get(self.pools[pool].accelerator)

    def planned_coefficients(self, pool: str) -> Coefficients:
        given = (self.coefficients or {}).get(pool)
        return given or default_coefficients(self.accelerator(pool))


@dataclass(frozen=True)
class Replan:
    """The decision to restart a pool's instances in `new`."""

    pool: str
    old: DeployConfig
    new: DeployConfig
    engine_args: dict[str, Any]
    coefficients: Coefficients
    measured: float  # output tokens/s per instance, as run
    predicted: float  # what the plan's coefficients said for that operating point
    refit_old: float  # the current configuration under the re-fitted coefficients
    expected: float  # the new configuration under them

    @property
    def gain(self) -> float:
        return self.expected / self.refit_old if self.refit_old > 0 else float("inf")

    def describe(self) -> str:
        return (
            f"pool {self.pool}: measured {self.measured:,.0f} output tok/s per instance against "
            f"{self.predicted:,.0f} predicted; re-fitted, {_changes(self.old, self.new)} "
            f"should give {self.expected:,.0f} ({self.gain:.2f}x): restarting its instances"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool, "engine_args": dict(self.engine_args),
            "measured": round(self.measured, 1), "predicted": round(self.predicted, 1),
            "refit_old": round(self.refit_old, 1), "expected": round(self.expected, 1),
            "gain": round(self.gain, 3), "old": self.old.label(), "new": self.new.label(),
        }


def _changes(old: DeployConfig, new: DeployConfig) -> str:
    names = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "kv_cache_dtype")
    parts = [f"{n} {getattr(old, n)} -> {getattr(new, n)}" for n in names
             if getattr(old, n) != getattr(new, n)]
    return ", ".join(parts) or "the same settings"


def predicted_rate(
    ctx: PlanContext, pool: str, cfg: DeployConfig, coef: Coefficients, batch: int,
    input_len: float, output_len: float,
) -> float:
    """Output tokens/s of one instance of `cfg` at `batch` sequences and these mean lengths."""
    d = deployment(ctx.model, ctx.accelerator(pool), coef, cfg)
    return estimate_instance(d, max(1, batch), cfg.max_num_batched_tokens, input_len,
                             output_len).output_tokens_per_s


def off_plan(predicted: float, measured: float, policy: ReplanPolicy) -> bool:
    """Whether the measured speed is beyond the threshold from the prediction."""
    return predicted > 0 and abs(measured / predicted - 1.0) > policy.threshold


def decide_replan(
    ctx: PlanContext, current: PoolPlan, seen: PoolMeasurement, policy: ReplanPolicy
) -> Replan | None:
    """Re-plan `current` from `seen`: a `Replan` when another configuration of the same
    instances now wins by the policy's margin, else None."""
    cfg = current.config
    batch = round(seen.concurrency) if seen.concurrency else max(current.concurrency, 1)
    batch = max(1, min(batch, cfg.max_num_seqs))
    shape = (max(seen.input_len, 1.0), max(seen.output_len, 1.0))
    planned = predicted_rate(ctx, current.pool, cfg, ctx.planned_coefficients(current.pool),
                             batch, *shape)
    if seen.output_tokens_per_s <= 0 or not off_plan(planned, seen.output_tokens_per_s, policy):
        return None
    coef = refit(ctx, current.pool, cfg, batch, shape, seen.output_tokens_per_s)
    reproduced = predicted_rate(ctx, current.pool, cfg, coef, batch, *shape)
    if abs(reproduced / seen.output_tokens_per_s - 1.0) > FIT_TOLERANCE:
        return None  # coefficients that do not explain the figure cannot choose a layout
    same = [c for c in candidates_for_pool(ctx.model, ctx.pools[current.pool], ctx.accelerator(
        current.pool), coef, ctx.workload, ctx.objective) if _same_instances(c.config, cfg)]
    if not same:
        return None
    best = choose(same)
    if best.config == cfg:
        return None
    old_batch = _steady_batch(same, cfg) or batch
    now = predicted_rate(ctx, current.pool, cfg, coef, old_batch, *shape)
    expected = predicted_rate(ctx, current.pool, best.config, coef,
                              best.per_instance.concurrency, *shape)
    if expected < now * (1.0 + policy.margin):
        return None
    args = engine_args(ctx.model, ctx.accelerator(current.pool), best.config, ctx.workload)
    return Replan(current.pool, cfg, best.config, args, coef, seen.output_tokens_per_s,
                  planned, now, expected)


def _same_instances(a: DeployConfig, b: DeployConfig) -> bool:
    """Configurations that keep the pool's instances (their devices and count) as they are."""
    return (a.tensor_parallel_size, a.pipeline_parallel_size, a.instances_per_node) == (
        b.tensor_parallel_size, b.pipeline_parallel_size, b.instances_per_node)


def _steady_batch(candidates: list, cfg: DeployConfig) -> int | None:
    """The concurrency the search gives the current configuration, if it is still feasible."""
    for c in candidates:
        if c.config == cfg:
            return c.per_instance.concurrency
    return None


def refit(
    ctx: PlanContext, pool: str, cfg: DeployConfig, batch: int, shape: tuple[float, float],
    output_tokens_per_s: float,
) -> Coefficients:
    """The accelerator's coefficients fitted to the live figure (from its defaults)."""
    acc = ctx.accelerator(pool)
    model = ctx.model.with_kv_cache_dtype(cfg.kv_cache_dtype)
    m = Measurement(
        accelerator=acc.name, model=model.name, tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size, concurrency=batch,
        input_len=shape[0], output_len=shape[1], quantization=model.quantization,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        output_tokens_per_s=output_tokens_per_s,
    )
    return fit_accelerator([m], acc, default_coefficients(acc), lambda _n, _q: model)


@dataclass(frozen=True)
class InstanceFigures:
    """What one instance did so far, as the coordinator (or the simulator) counts it."""

    pool: str
    units: int
    active_s: float  # first lease to last commit
    completion_tokens: int
    rows: int
    prompt_tokens: int = 0
    concurrency: float | None = None  # mean requests running in its engine, when reported


def pool_measurement(
    pool: str, figures: Iterable[InstanceFigures], policy: ReplanPolicy
) -> PoolMeasurement | None:
    """A pool's figure from its instances that have done enough to count (None: none has)."""
    ready = [f for f in figures if f.pool == pool and f.units >= policy.min_units
             and f.active_s >= policy.min_active_s and f.rows > 0]
    if not ready:
        return None
    rows = sum(f.rows for f in ready)
    running = [f.concurrency for f in ready if f.concurrency]
    return PoolMeasurement(
        pool, len(ready),
        output_tokens_per_s=sum(f.completion_tokens / f.active_s for f in ready) / len(ready),
        input_len=sum(f.prompt_tokens for f in ready) / rows,
        output_len=sum(f.completion_tokens for f in ready) / rows,
        concurrency=sum(running) / len(running) if running else None,
    )


@dataclass
class Replanner:
    """Watches every planned pool against its plan and re-plans each at most once.

    Pure: the caller passes the figures it holds and acts on the answer (the coordinator by
    telling the pool's workers to restart, the simulator by restarting its instances).
    """

    ctx: PlanContext
    plans: dict[str, PoolPlan]
    policy: ReplanPolicy = field(default_factory=ReplanPolicy)
    done: dict[str, Replan] = field(default_factory=dict)

    def check(self, figures: Iterable[InstanceFigures]) -> list[Replan]:
        """Re-plans due now, one per pool at most (and once per run)."""
        figures = list(figures)
        out = []
        for pool, plan in self.plans.items():
            if pool in self.done:
                continue
            seen = pool_measurement(pool, figures, self.policy)
            if seen is None:
                continue
            decision = decide_replan(self.ctx, plan, seen, self.policy)
            if decision is not None:
                self.done[pool] = decision
                self.plans[pool] = replace(
                    plan, config=decision.new, engine_args=decision.engine_args,
                    capacity_weight=decision.expected)
                out.append(decision)
        return out
