"""From pools to instances: which instance runs where, on which devices, with which engine args.

A pool is nodes x devices per node of one accelerator type; an instance uses
`tensor_parallel_size` devices of one node. On `cpu` pools a device is a core, and an instance is
pinned to its cores so that instances side by side do not share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hetbatch.spec import JobSpec, PoolSpec


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


def instance_layout(job: JobSpec) -> list[InstanceSpec]:
    instances = []
    for pool in job.cluster.pools:
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
