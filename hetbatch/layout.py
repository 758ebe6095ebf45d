"""From pools to instances: which instance runs where, on which devices, with which engine args.

A pool is nodes x devices per node of one accelerator type; an instance uses
`tensor_parallel_size x pipeline_parallel_size` devices, of one node or, when that is more than a
node holds, of `nodes` consecutive nodes (the same device slots on each). A spanning instance is
still one instance: one worker, on its head node (the first), talks to the coordinator; the
processes on its other nodes only serve the engine. On `cpu` pools a device is a core, and an
instance is pinned to its cores so that instances side by side do not share one.
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
    nodes: int = 1  # nodes spanned: `node` (the head) and the next `nodes - 1`

    @property
    def is_cpu(self) -> bool:
        return self.accelerator.lower() == "cpu"

    @property
    def spans_nodes(self) -> bool:
        return self.nodes > 1

    def rank_of(self, node: int) -> int | None:
        """This instance's node rank on pool node `node` (0 is the head), or None."""
        rank = node - self.node
        return rank if 0 <= rank < self.nodes else None


def pool_layout(pool: PoolSpec) -> tuple[int, int]:
    """(tensor_parallel_size, instances_per_node) pinned by the pool, or the simplest default."""
    tp = pool.tensor_parallel_size or 1
    per_instance = tp * (pool.pipeline_parallel_size or 1)
    return tp, pool.instances_per_node or max(pool.devices_per_node // per_instance, 1)


def nodes_spanned(devices_per_instance: int, devices_per_node: int) -> int:
    """How many nodes an instance of this many devices takes (1 when it fits one)."""
    return -(-devices_per_instance // devices_per_node)


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
            tp = pool_plan.config.tensor_parallel_size
            pp = pool_plan.config.pipeline_parallel_size
            per_node = pool.instances_per_node or pool_plan.config.instances_per_node
            span = pp if pp > 1 else 1  # the planner puts pipeline stages on separate nodes
            weight = pool.capacity_weight or pool_plan.capacity_weight
            args = {**pool_plan.engine_args, **job.model.engine_args, **pool.engine_args}
        else:
            tp, per_node = pool_layout(pool)
            pp = pool.pipeline_parallel_size or 1
            span = nodes_spanned(tp * pp, pool.devices_per_node)
            weight = pool_weight(job, pool, tp * pp)
            args = {**job.model.engine_args, **pool.engine_args}
        args.update(_parallel_args(tp, pp, span))
        on_each = tp * pp // span  # devices of one instance on each of its nodes
        for node in range(0, pool.nodes - span + 1, span):
            for k in range(per_node):
                instances.append(
                    InstanceSpec(
                        f"{pool.name}-{node}-{k}",
                        pool.name,
                        pool.accelerator,
                        node,
                        tuple(range(k * on_each, (k + 1) * on_each)),
                        weight,
                        dict(args),
                        span,
                    )
                )
    return instances


def _parallel_args(tp: int, pp: int, span: int) -> dict[str, Any]:
    """vLLM's parallel settings; across nodes, its multiprocessing backend (no Ray). Each node's
    rank and the head's address are only known where it runs (`span_env`)."""
    args: dict[str, Any] = {}
    if tp > 1:
        args["tensor_parallel_size"] = tp
    if pp > 1:
        args["pipeline_parallel_size"] = pp
    if span > 1:
        args.update(distributed_executor_backend="mp", nnodes=span)
    return args


def device_env(instance: InstanceSpec) -> dict[str, str]:
    """Environment that gives an instance its devices (and only those)."""
    ids = ",".join(str(d) for d in instance.devices)
    if instance.is_cpu and instance.spans_nodes:
        # One vLLM rank per core on each node: "0|1" binds local rank 0 to core 0, 1 to 1.
        return {
            "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(d) for d in instance.devices),
            "OMP_NUM_THREADS": "1",
        }
    if instance.is_cpu:
        return {
            "VLLM_CPU_OMP_THREADS_BIND": ids
            if len(instance.devices) == 1
            else f"{instance.devices[0]}-{instance.devices[-1]}",
            "OMP_NUM_THREADS": str(len(instance.devices)),
        }
    return {"CUDA_VISIBLE_DEVICES": ids}
