"""sbatch scripts of a job, rendered from the templates shipped in `templates/` beside this file.

One coordinator script (a small CPU job), one script per pool asking for that pool's
accelerators, or with `hetjob` all of them as components of one heterogeneous job.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from string import Template

from hetbatch.errors import UserError
from hetbatch.layout import InstanceSpec
from hetbatch.spec import JobSpec, PoolSpec, SlurmJobOptions


@dataclass(frozen=True)
class Script:
    """One script to submit: `role` is `coordinator`, `pool` or `hetjob`."""

    name: str
    role: str
    text: str
    pool: str | None = None


# Jobs Slurm may run again (requeued on a node failure, or by a pool job out of time): a run's
# output goes on after the earlier run's instead of replacing it (Slurm truncates by default).
REQUEUEABLE = ["--requeue", "--open-mode=append"]


def _template(name: str) -> Template:
    """A template from the installed package (package data, so any install has them)."""
    return Template((resources.files("hetbatch.launch.slurm") / "templates" / name).read_text())


def _options(opts: SlurmJobOptions, inherit: SlurmJobOptions | None = None) -> list[str]:
    """Placement lines from a `slurm:` section; account, qos and time fall back to `inherit`."""
    lines = []
    for key in ("partition", "account", "qos", "time", "constraint", "mem"):
        value = getattr(opts, key)
        if value is None and inherit is not None and key in ("account", "qos", "time"):
            value = getattr(inherit, key)
        if value is not None:
            lines.append(f"--{key}={value}")
    return lines


def _header(options: list[str], extra: list[str]) -> list[str]:
    lines = [f"#SBATCH {o}" for o in options]
    for line in extra:
        line = line.strip()
        lines.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
    return lines


def _gres(pool: PoolSpec) -> list[str]:
    if pool.accelerator.lower() == "cpu":
        return []
    kind = pool.accelerator.lower() if pool.slurm.gres_type is None else pool.slurm.gres_type
    return [f"--gres=gpu:{kind + ':' if kind else ''}{pool.devices_per_node}"]


def _cpus(pool: PoolSpec) -> list[str]:
    cpus = pool.slurm.cpus_per_task
    if cpus is None and pool.accelerator.lower() == "cpu":
        cpus = pool.devices_per_node  # on cpu pools a device is a core
    return [f"--cpus-per-task={cpus}"] if cpus else []


def coordinator_options(job: JobSpec, log_dir: str) -> list[str]:
    s = job.slurm
    return [
        f"--job-name={s.job_name}-coordinator",
        f"--output={log_dir}/%x-%j.out",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={s.cpus_per_task or 1}",
        *REQUEUEABLE,
        *_options(s),
    ]


def pool_options(job: JobSpec, pool: PoolSpec, log_dir: str, hetjob: bool = False) -> list[str]:
    array = pool.slurm.array and pool.nodes > 1 and not hetjob
    lines = [] if hetjob else [f"--job-name={job.slurm.job_name}-{pool.name}"]
    if not hetjob:
        lines.append(f"--output={log_dir}/%x-{'%A_%a' if array else '%j'}.out")
    lines += [
        f"--nodes={1 if array else pool.nodes}",
        "--ntasks-per-node=1",
        *_gres(pool),
        *_cpus(pool),
    ]
    if array:
        lines.append(f"--array=0-{pool.nodes - 1}")
    if not hetjob:
        lines += REQUEUEABLE
    return lines + _options(pool.slurm, job.slurm)


def _spans(pool: PoolSpec) -> bool:
    per_instance = (pool.tensor_parallel_size or 1) * (pool.pipeline_parallel_size or 1)
    return per_instance > pool.devices_per_node


def span_of(pool: PoolSpec, instances: list[InstanceSpec]) -> int:
    """Nodes one instance of the pool spans (1: instances live on one node)."""
    return max((i.nodes for i in instances if i.pool == pool.name), default=1)


def span_options(job: JobSpec, pool: PoolSpec, span: int, log_dir: str) -> list[str]:
    """One allocation per instance: its nodes, as one array task per instance."""
    groups = pool.nodes // span
    array = [f"--array=0-{groups - 1}"] if groups > 1 else []
    return [
        f"--job-name={job.slurm.job_name}-{pool.name}",
        f"--output={log_dir}/%x-{'%A_%a' if array else '%j'}.out",
        f"--nodes={span}",
        "--ntasks-per-node=1",
        *_gres(pool),
        *_cpus(pool),
        *array,
        *REQUEUEABLE,
        *_options(pool.slurm, job.slurm),
    ]


def _per_node(pool: PoolSpec, instances: list[InstanceSpec]) -> int:
    return sum(1 for i in instances if i.pool == pool.name and i.node == 0)


def render(
    job: JobSpec,
    instances: list[InstanceSpec],
    log_dir: str,
    pools: list[str] | None = None,
    coordinator: bool = True,
) -> list[Script]:
    """Scripts for the coordinator (if asked) and the named pools (default: every pool)."""
    python, output = shlex.quote(sys.executable), shlex.quote(job.output.path)
    scripts = []
    if coordinator:
        lines = _header(coordinator_options(job, log_dir), job.slurm.extra)
        text = _template("coordinator.sbatch").substitute(
            sbatch_lines="\n".join(lines), python=python, output=output
        )
        scripts.append(Script("coordinator", "coordinator", text))
    for pool in job.cluster.pools:
        if pools is not None and pool.name not in pools:
            continue
        span = span_of(pool, instances)
        if span > 1:
            lines = _header(span_options(job, pool, span, log_dir), pool.slurm.extra)
            text = _template("span.sbatch").substitute(
                sbatch_lines="\n".join(lines),
                pool=shlex.quote(pool.name),
                accelerator=pool.accelerator,
                span=span,
                output=output,
                python=python,
                launch="srun --ntasks-per-node=1 --kill-on-bad-exit=1",
                restarts=job.launch.max_worker_restarts,
            )
            scripts.append(Script(f"pool-{pool.name}", "pool", text, pool.name))
            continue
        array = pool.slurm.array and pool.nodes > 1
        lines = _header(pool_options(job, pool, log_dir), pool.slurm.extra)
        text = _template("pool.sbatch").substitute(
            sbatch_lines="\n".join(lines),
            pool=shlex.quote(pool.name),
            accelerator=pool.accelerator,
            per_node=_per_node(pool, instances),
            nodes=pool.nodes,
            output=output,
            python=python,
            launch="" if array or pool.nodes == 1 else "srun --ntasks-per-node=1 ",
        )
        scripts.append(Script(f"pool-{pool.name}", "pool", text, pool.name))
    return scripts


def hetjob_order(pools: list[PoolSpec]) -> list[PoolSpec]:
    """Pools in component order, most demanding first.

    Slurm places a heterogeneous job's components one at a time, in order, each on the first
    nodes that fit and never on a node an earlier component holds, and does not revisit that
    choice: a CPU pool placed first on the only node with the GPUs a later pool needs leaves
    the whole job pending for good. GPU pools, then more nodes, then more devices go first."""
    return sorted(
        pools, key=lambda p: (p.accelerator.lower() == "cpu", -p.nodes, -p.devices_per_node)
    )


def render_hetjob(job: JobSpec, log_dir: str) -> Script:
    """Every pool as one component of a heterogeneous job, so all pools start together.

    The coordinator runs in the batch script on the first node of component 0, beside that
    pool's workers, rather than as a component of its own: components never share a node,
    so it would hold a whole node and could take the only one a pool fits on."""
    python, output = shlex.quote(sys.executable), shlex.quote(job.output.path)
    spanning = [p.name for p in job.cluster.pools if _spans(p)]
    if spanning:
        raise UserError(
            f"pool {spanning[0]}: instances that span nodes run as one allocation each; "
            "submit without --hetjob"
        )
    lines = _header(
        [f"--job-name={job.slurm.job_name}", f"--output={log_dir}/%x-%j.out", *REQUEUEABLE],
        job.slurm.extra,
    )
    steps = [f"{python} -m hetbatch coordinate {output} &", "pids=($!)"]
    for group, pool in enumerate(hetjob_order(job.cluster.pools)):
        if group:
            lines.append("#SBATCH hetjob")
        lines += _header(pool_options(job, pool, log_dir, hetjob=True), pool.slurm.extra)
        steps += [
            f"srun --het-group={group} --ntasks-per-node=1 {python} -m hetbatch.launch.slurm.node "
            f"{output} --pool {shlex.quote(pool.name)} &",
            "pids+=($!)",
        ]
    text = _template("hetjob.sbatch").substitute(
        sbatch_lines="\n".join(lines), output=output, steps="\n".join(steps)
    )
    return Script("hetjob", "hetjob", text)
