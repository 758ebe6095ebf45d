"""Plain inputs and outputs of the planner.

The planner is fed plain frozen dataclasses rather than the job-file objects so that it can be
used (and tested) without a job file: the job-file code converts its spec into these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hetbatch.errors import UserError
from hetbatch.planner.profile import KV_CACHE_DTYPES

Objective = Literal["throughput", "cost", "deadline"]
OBJECTIVES: tuple[str, ...] = ("throughput", "cost", "deadline")


@dataclass(frozen=True)
class PoolRequest:
    """One homogeneous part of the cluster: `nodes` machines with `devices_per_node` cards each.

    Pinned values (tensor_parallel_size, instances_per_node, max_num_seqs,
    max_num_batched_tokens, gpu_memory_utilization) restrict the search to them.
    """

    name: str
    accelerator: str
    devices_per_node: int
    nodes: int = 1
    price_per_device_hour: float | None = None
    tensor_parallel_size: int | None = None
    instances_per_node: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    # KV cache formats to try: ("auto",) keeps the model's dtype; ("auto", "fp8") searches both.
    kv_cache_dtypes: tuple[str, ...] = ("auto",)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kv_cache_dtypes if k not in KV_CACHE_DTYPES]
        if unknown or not self.kv_cache_dtypes:
            raise UserError(f"pool {self.name!r}: kv_cache_dtype {unknown or 'none'}; known: "
                            f"{', '.join(KV_CACHE_DTYPES)}")
        if self.devices_per_node < 1 or self.nodes < 1:
            raise UserError(f"pool {self.name!r}: devices_per_node and nodes must be >= 1")
        if self.price_per_device_hour is not None and self.price_per_device_hour < 0:
            raise UserError(f"pool {self.name!r}: price_per_device_hour must be >= 0")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size < 1:
            raise UserError(f"pool {self.name!r}: tensor_parallel_size must be >= 1")
        if self.instances_per_node is not None and self.instances_per_node < 1:
            raise UserError(f"pool {self.name!r}: instances_per_node must be >= 1")
        mem = self.gpu_memory_utilization
        if mem is not None and not 0 < mem <= 1:
            raise UserError(f"pool {self.name!r}: gpu_memory_utilization must be in (0, 1]")
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"pool {self.name!r}: {key} must be >= 1")


@dataclass(frozen=True)
class Workload:
    """Token lengths of the job's rows; lengths are in tokens.

    The means size the work; the maxima size the context reserved per sequence (vLLM's
    max_model_len), and a row longer than that fails alone. `input_len_max` defaults to twice
    the p95 and `output_len_max` (the sampling max_tokens) to twice the mean output length.
    """

    input_len_mean: float
    input_len_p95: float
    output_len_mean: float
    rows: int | None = None
    input_len_max: int | None = None
    output_len_max: int | None = None

    def __post_init__(self) -> None:
        if self.input_len_mean <= 0 or self.output_len_mean <= 0:
            raise UserError("workload: input and output lengths must be > 0")
        if self.input_len_p95 < self.input_len_mean * 0.5:
            raise UserError("workload: input_len_p95 is smaller than half the mean")
        if self.rows is not None and self.rows < 0:
            raise UserError("workload: rows must be >= 0")

    @classmethod
    def from_samples(
        cls,
        input_lens: Sequence[int],
        output_len_mean: float,
        rows: int | None = None,
        output_len_max: int | None = None,
    ) -> Workload:
        """Build from a sample of prompt lengths (e.g. a tokenized slice of the input)."""
        if not input_lens:
            raise UserError("workload: the sample of input lengths is empty")
        ordered = sorted(int(n) for n in input_lens)
        p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(
            input_len_mean=sum(ordered) / len(ordered),
            input_len_p95=float(p95),
            output_len_mean=output_len_mean,
            rows=rows,
            input_len_max=ordered[-1],
            output_len_max=output_len_max,
        )

    @property
    def output_max(self) -> int:
        return int(self.output_len_max or math.ceil(2 * self.output_len_mean))

    @property
    def input_max(self) -> int:
        return int(self.input_len_max or math.ceil(2 * self.input_len_p95))


@dataclass(frozen=True)
class DeployConfig:
    """One deployment of the model on a pool: every instance of the pool runs the same one."""

    tensor_parallel_size: int
    pipeline_parallel_size: int
    instances_per_node: int
    instances: int
    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    kv_cache_dtype: str = "auto"

    @property
    def devices_per_instance(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def label(self) -> str:
        kv = "" if self.kv_cache_dtype == "auto" else f" kv={self.kv_cache_dtype}"
        return (
            f"TP={self.tensor_parallel_size} PP={self.pipeline_parallel_size} "
            f"x{self.instances} seqs={self.max_num_seqs} "
            f"tokens={self.max_num_batched_tokens} mem={self.gpu_memory_utilization:.2f}{kv}"
        )


@dataclass(frozen=True)
class Estimate:
    """What the throughput model predicts for one instance of a configuration."""

    output_tokens_per_s: float
    total_tokens_per_s: float
    concurrency: int
    kv_cache_tokens: int
    bound: str  # which resource dominates the time: "compute", "memory", "communication", ...


@dataclass(frozen=True)
class Candidate:
    """A feasible configuration with its estimate, as ranked by the search."""

    config: DeployConfig
    per_instance: Estimate
    score: float
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        pool_rate = self.per_instance.output_tokens_per_s * self.config.instances
        return {
            **asdict(self.config),
            "output_tokens_per_s": round(pool_rate, 1),
            "per_instance_output_tokens_per_s": round(self.per_instance.output_tokens_per_s, 1),
            "concurrency": self.per_instance.concurrency,
            "bound": self.per_instance.bound,
            "score": round(self.score, 6),
            "why": self.why,
        }


@dataclass(frozen=True)
class Rejected:
    """An infeasible configuration and the reason, kept so a user can see why it lost."""

    config: DeployConfig
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.config), "reason": self.reason}


@dataclass(frozen=True)
class PoolPlan:
    """The chosen deployment of one pool and what it is expected to do."""

    pool: str
    accelerator: str
    nodes: int
    nodes_used: int
    devices_per_node: int
    config: DeployConfig
    engine_args: dict[str, Any]
    output_tokens_per_s: float
    total_tokens_per_s: float
    capacity_weight: float
    share: float
    est_time_s: float | None
    cost_per_hour: float | None
    runners_up: tuple[Candidate, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    concurrency: int = 0
    bound: str = ""

    @property
    def instances(self) -> int:
        return self.config.instances

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "pool": self.pool,
            "accelerator": self.accelerator,
            "nodes": self.nodes,
            "nodes_used": self.nodes_used,
            "devices_per_node": self.devices_per_node,
            "tensor_parallel_size": c.tensor_parallel_size,
            "pipeline_parallel_size": c.pipeline_parallel_size,
            "instances_per_node": c.instances_per_node,
            "instances": c.instances,
            "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "kv_cache_dtype": c.kv_cache_dtype,
            "engine_args": dict(self.engine_args),
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "total_tokens_per_s": round(self.total_tokens_per_s, 1),
            "capacity_weight": round(self.capacity_weight, 1),
            "share": round(self.share, 4),
            "est_time_s": None if self.est_time_s is None else round(self.est_time_s, 1),
            "cost_per_hour": self.cost_per_hour,
            "concurrency": self.concurrency,
            "bound": self.bound,
            "runners_up": [r.to_dict() for r in self.runners_up],
            "rejected": [r.to_dict() for r in self.rejected],
        }


@dataclass(frozen=True)
class ClusterPlan:
    """The plan for the whole cluster: one PoolPlan per pool that takes part."""

    model: str
    quantization: str
    objective: str
    pools: tuple[PoolPlan, ...]
    output_tokens_per_s: float
    total_tokens_per_s: float
    est_time_s: float | None
    cost_per_hour: float | None
    est_cost: float | None
    deadline_s: float | None = None
    unused_pools: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "quantization": self.quantization,
            "objective": self.objective,
            "deadline_s": self.deadline_s,
            "output_tokens_per_s": round(self.output_tokens_per_s, 1),
            "total_tokens_per_s": round(self.total_tokens_per_s, 1),
            "est_time_s": None if self.est_time_s is None else round(self.est_time_s, 1),
            "cost_per_hour": self.cost_per_hour,
            "est_cost": None if self.est_cost is None else round(self.est_cost, 2),
            "unused_pools": list(self.unused_pools),
            "notes": list(self.notes),
            "pools": [p.to_dict() for p in self.pools],
        }
