"""The rows each pool will really receive when rows are dealt by the context they need.

A row needs its prompt's tokens plus max_tokens of context. A pool whose engines hold less
(its `max_model_len`) never gets it: the rows only the larger pools hold all go there, and the
rows every pool holds are shared. The planner sizes each pool for its own mix: the small pool
for short rows only, the big pool for its share of the short rows plus every long one.

Pure: a sample of prompt lengths in, one workload per pool out. Rows are shared among the
pools that hold them in proportion to each pool's devices (the planner's sizes are not known
yet; devices are what a pool brings). Rows no pool holds are left out: they become row errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hetbatch.errors import UserError
from hetbatch.planner.types import Workload


def pool_workloads(
    input_lens: Sequence[int],
    workload: Workload,
    contexts: Mapping[str, int | None],
    shares: Mapping[str, float],
) -> dict[str, Workload]:
    """Per pool, the workload of the rows it will receive (only pools whose context leaves
    some rows to others; empty when every pool holds every sampled row). `contexts`: each
    pool's max_model_len (None: any row); `shares`: each pool's devices."""
    lens = [int(n) for n in input_lens]
    needs = [n + workload.output_max for n in lens]
    limited = {p: c for p, c in contexts.items() if c is not None}
    if not lens or all(n <= c for c in limited.values() for n in needs):
        return {}
    weights: dict[str, list[float]] = {p: [0.0] * len(lens) for p in contexts}
    for i, need in enumerate(needs):
        holders = [p for p, c in contexts.items() if c is None or need <= c]
        total = sum(max(shares.get(p, 1.0), 1e-9) for p in holders)
        for p in holders:
            weights[p][i] = max(shares.get(p, 1.0), 1e-9) / total
    out = {}
    for pool, w in weights.items():
        mix = _weighted(lens, w, workload, len(lens))
        if mix is not None:
            out[pool] = mix
    return out


def _weighted(
    lens: list[int], weights: list[float], workload: Workload, sampled: int
) -> Workload | None:
    """A workload of the sampled rows under `weights` (a row's share that goes here)."""
    total = sum(weights)
    if total <= 0:
        return None
    mean = sum(n * w for n, w in zip(lens, weights, strict=True)) / total
    ordered = sorted((n, w) for n, w in zip(lens, weights, strict=True) if w > 0)
    seen, p95 = 0.0, ordered[-1][0]
    for n, w in ordered:
        seen += w
        if seen >= 0.95 * total:
            p95 = n
            break
    rows = None if workload.rows is None else math.ceil(workload.rows * total / sampled)
    try:
        return Workload(
            input_len_mean=mean,
            input_len_p95=float(max(p95, mean * 0.5)),
            output_len_mean=workload.output_len_mean,
            rows=rows,
            input_len_max=ordered[-1][0],
            output_len_max=workload.output_len_max,
        )
    except UserError:
        return None
