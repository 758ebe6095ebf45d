"""From pools to instances: which instance runs where, on which devices, with which engine args.

A pool is nodes x devices per node of one accelerator type; an instance uses
`tensor_parallel_size` devices of one node. On `cpu` pools a device is a core, and an instance is
pinned to its cores so that instances side by side do not share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hetbatch.spec import JobSpec, PoolSpec

if TYPE_CHECKING:
    from hetbatch.planner.types import ClusterPlan


@dataclass(frozen=True)
class InstanceSpec:
    instance_id: str
    pool: str
    accelerator: str
    node: int
    devices: tuple[int, ...]
    weight: float
    engine_args: dict[str, Any] = field(default_factory=dict)

    @property
    def is_cpu(self) -> bool:
        return self.accelerator.lower() == "cpu"


def pool_layout(pool: PoolSpec) -> tuple[int, int]:
    """(tensor_parallel_size, instances_per_node) pinned by the pool, or the simplest default."""
    tp = pool.tensor_parallel_size or 1
    return tp, pool.instances_per_node or pool.devices_per_node // tp


def pool_weight(job: JobSpec, pool: PoolSpec, tp: int) -> float:
    """The capacity an instance starts with, before measurements correct it."""
    if pool.capacity_weight is not None:
        return pool.capacity_weight
    if job.engine.kind == "sim":
        return (pool.sim or job.engine.sim).tokens_per_s
    return float(tp)


def needs_plan(job: JobSpec) -> bool:
    """Whether some pool leaves its instance layout to the planner."""
    return job.engine.kind == "vllm" and any(
        p.tensor_parallel_size is None for p in job.cluster.pools
    )


def instance_layout(job: JobSpec, plan: ClusterPlan | None = None) -> list[InstanceSpec]:
    """Instances of every pool: as the pool pins them, else as the plan sizes them."""
    planned = {p.pool: p for p in plan.pools} if plan is not None else {}
    instances = []
    for pool in job.cluster.pools:
        pool_plan = planned.get(pool.name) if pool.tensor_parallel_size is None else None
        if pool_plan is not None:
            tp = pool_plan.config.devices_per_instance
            per_node = pool.instances_per_node or pool_plan.config.instances_per_node
            weight = pool.capacity_weight or pool_plan.capacity_weight
            args = {**pool_plan.engine_args, **job.model.engine_args, **pool.engine_args}
        else:
            tp, per_node = pool_layout(pool)
            weight = pool_weight(job, pool, tp)
            args = {**job.model.engine_args, **pool.engine_args}
            if tp > 1:
                args["tensor_parallel_size"] = tp
        for node in range(pool.nodes):
            for k in range(per_node):
                devices = tuple(range(k * tp, (k + 1) * tp))
                instances.append(
                    InstanceSpec(
                        f"{pool.name}-{node}-{k}",
                        pool.name,
                        pool.accelerator,
                        node,
                        devices,
                        weight,
                        dict(args),
                    )
                )
    return instances


def device_env(instance: InstanceSpec) -> dict[str, str]:
    """Environment that gives an instance its devices (and only those)."""
    ids = ",".join(str(d) for d in instance.devices)
    if instance.is_cpu:
        return {
            "VLLM_CPU_OMP_THREADS_BIND": ids
            if len(instance.devices) == 1
            else f"{instance.devices[0]}-{instance.devices[-1]}",
            "OMP_NUM_THREADS": str(len(instance.devices)),
        }
    return {"CUDA_VISIBLE_DEVICES": ids}
