"""Baseline dealing policies behind the one Scheduler interface, selectable by name.

They exist to measure hetbatch's dealing against what other systems do, under the very same
simulator and coordinator. Every policy keeps the Scheduler's leases, expiry, leave and
exactly-once commits; only how rows are handed out differs. Static policies fix who owns which
rows up front; rows they can no longer deliver (a lost instance's shard, a lapsed lease) become
orphans that any instance with nothing of its own left picks up, as a retry would.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from hetbatch.scheduler.bounds import RowBounds
from hetbatch.scheduler.core import InstanceState, Lease, Scheduler, SchedulerConfig, Wait
from hetbatch.scheduler.ranges import RangeSet

POLICIES = ("hetbatch", "round-robin", "static-equal", "static-proportional", "pull-fixed")

Expected = Sequence[tuple[str, float]]  # (instance id, planned weight), in dealing order


def default_block_rows(total_rows: int, config: SchedulerConfig, instances: int) -> int:
    """Fixed unit size of the baselines: about eight units per instance, within the bounds."""
    if instances <= 0:
        return config.max_unit_rows
    size = math.ceil(total_rows / (8 * instances))
    return max(config.min_unit_rows, min(config.max_unit_rows, size))


class PullFixedScheduler(Scheduler):
    """Fixed-size blocks pulled by whichever instance asks (an actor pool): no stealing, no
    shrinking, no use of capacity."""

    def __init__(self, *args, block_rows: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block_rows = block_rows or self.config.max_unit_rows

    def _deal(self, state: InstanceState, now: float) -> Lease | Wait:
        if not self.pending:
            return self._nothing_free(state)
        start, end = self.pending.first()
        cut = min(end, start + self.block_rows)
        self.pending.remove(start, cut)
        return self._issue(state.instance_id, start, cut, now)


class StaticScheduler(Scheduler):
    """Rows owned by instances from the start; subclasses decide the ownership."""

    def __init__(self, *args, expected: Expected = (), block_rows: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected = list(expected)
        self.block_rows = block_rows
        self.queues: dict[str, deque[tuple[int, int]]] | None = None
        self.orphans = RangeSet()

    # -- ownership ----------------------------------------------------------------------------

    def _block(self) -> int:
        n = len(self.expected) or 1
        return self.block_rows or default_block_rows(self.pending.total, self.config, n)

    def _assign(self) -> dict[str, deque[tuple[int, int]]]:
        raise NotImplementedError

    def _ensure_layout(self) -> None:
        if self.queues is not None:
            return
        if not self.expected:  # assign among the instances that have joined so far
            self.expected = [(i, s.planned_weight) for i, s in self.instances.items()]
        self.queues = self._assign()
        for iid, state in self.instances.items():
            if not state.alive:
                self._orphan_queue(iid)

    def _orphan_queue(self, instance_id: str) -> None:
        queue = (self.queues or {}).pop(instance_id, None)
        for a, b in queue or ():
            self.orphans.add(a, b)

    def _shards(self, weights: Sequence[float]) -> list[list[tuple[int, int]]]:
        """Contiguous shards of the pending rows proportional to `weights`, cut into blocks."""
        total, block = self.pending.total, self._block()
        bounds = [round(total * c / sum(weights)) for c in _cumsum(weights)]
        ranges = _ranges_by_offset(self.pending, [0, *bounds])
        return [_blocks(r, block) for r in ranges]

    # -- dealing ------------------------------------------------------------------------------

    def _deal(self, state: InstanceState, now: float) -> Lease | Wait:
        self._ensure_layout()
        got = self._own(state.instance_id) or self._orphan()
        if got is None:
            return self._nothing_free(state)
        self.pending.remove(*got)
        return self._issue(state.instance_id, *got, now)

    def _own(self, instance_id: str) -> tuple[int, int] | None:
        queue = (self.queues or {}).get(instance_id)
        while queue:
            a, b = queue.popleft()
            if self.pending.contains(a, b):
                return a, b
        return None

    def _orphan(self) -> tuple[int, int] | None:
        if not self.orphans:
            return None
        a, b = self.orphans.first()
        cut = min(b, a + self._block())
        self.orphans.remove(a, cut)
        return a, cut

    # -- losses -------------------------------------------------------------------------------

    def leave(self, instance_id: str, now: float) -> list[Lease]:
        returned = super().leave(instance_id, now)
        self._orphan_queue(instance_id)
        return returned

    def _return_lease(self, lease_id: int) -> Lease:
        """A lease came back (its owner left or went silent): its rows and the owner's
        remaining shard are re-dealt to whoever asks."""
        lease = super()._return_lease(lease_id)
        self.orphans.add(lease.start, lease.end)
        self._orphan_queue(lease.instance)
        return lease

    def commit(
        self, instance_id: str, lease_id: int, start: int, end: int, now: float,
        handed_back: bool = False,
    ):
        status = super().commit(instance_id, lease_id, start, end, now, handed_back)
        self.orphans.remove(start, end)  # a late commit of a lapsed lease took them back
        return status


class RoundRobinScheduler(StaticScheduler):
    """Fixed-size units dealt to the instances in strict rotation, regardless of capacity."""

    def _assign(self) -> dict[str, deque[tuple[int, int]]]:
        ids = [i for i, _ in self.expected]
        queues: dict[str, deque[tuple[int, int]]] = {i: deque() for i in ids}
        blocks = [b for r in self.pending for b in _blocks(r, self._block())]
        for k, blk in enumerate(blocks):
            queues[ids[k % len(ids)]].append(blk)
        return queues


class StaticEqualScheduler(StaticScheduler):
    """Equal contiguous shards, one per instance."""

    def _assign(self) -> dict[str, deque[tuple[int, int]]]:
        shards = self._shards([1.0] * len(self.expected))
        return {i: deque(s) for (i, _), s in zip(self.expected, shards, strict=True)}


class StaticProportionalScheduler(StaticScheduler):
    """Contiguous shards proportional to planned capacity, never corrected."""

    def _assign(self) -> dict[str, deque[tuple[int, int]]]:
        shards = self._shards([max(w, 1e-9) for _, w in self.expected])
        return {i: deque(s) for (i, _), s in zip(self.expected, shards, strict=True)}


def make_scheduler(
    policy: str,
    total_rows: int,
    config: SchedulerConfig | None = None,
    committed: Sequence[tuple[int, int]] = (),
    boundaries: Sequence[int] = (),
    instances: Expected = (),
    block_rows: int | None = None,
    bounds: RowBounds | None = None,
) -> Scheduler:
    """A scheduler dealing by `policy`. `instances` (id, planned weight) fixes the static
    layouts up front; without it they use the instances joined at the first request. Per-row
    `bounds` (known work) only hetbatch's own dealing uses."""
    config = config or SchedulerConfig()
    if block_rows is None and instances:
        block_rows = default_block_rows(total_rows, config, len(instances))
    args = (total_rows, config, committed, boundaries)
    if policy == "hetbatch":
        return Scheduler(*args, bounds=bounds)
    if policy == "pull-fixed":
        return PullFixedScheduler(*args, block_rows=block_rows)
    static = {
        "round-robin": RoundRobinScheduler,
        "static-equal": StaticEqualScheduler,
        "static-proportional": StaticProportionalScheduler,
    }
    if policy not in static:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    return static[policy](*args, expected=instances, block_rows=block_rows)


def _cumsum(xs: Sequence[float]) -> list[float]:
    out, acc = [], 0.0
    for x in xs:
        acc += x
        out.append(acc)
    return out


def _ranges_by_offset(rows: RangeSet, offsets: list[int]) -> list[list[tuple[int, int]]]:
    """Split the rows of `rows`, in order, at the given row offsets (counted within the set)."""
    out: list[list[tuple[int, int]]] = [[] for _ in offsets[1:]]
    k, seen = 0, 0
    for a, b in rows:
        while a < b and k < len(out):
            take = min(b - a, offsets[k + 1] - seen)
            if take > 0:
                out[k].append((a, a + take))
                a, seen = a + take, seen + take
            if seen >= offsets[k + 1]:
                k += 1
    return out


def _blocks(ranges: list[tuple[int, int]] | tuple[int, int], block: int) -> list[tuple[int, int]]:
    items = [ranges] if isinstance(ranges, tuple) else ranges
    return [(s, min(s + block, b)) for a, b in items for s in range(a, b, block)]
