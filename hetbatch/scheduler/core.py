"""The scheduler's decisions: who gets which rows, when a lease lapses, who steals from whom.

Pure and deterministic: no I/O, no threads, no clock of its own (every call takes `now`). The live
coordinator drives it with the real clock and real workers; the simulator drives the very same
object with a simulated clock. Dealing follows weighted factoring: an instance asking for work
gets a share of the remaining rows proportional to its capacity, divided by `factor`, so units
shrink as the job nears its end and every instance finishes at about the same time. When nothing
is left to deal, an idle instance steals the unstarted tail of the instance with the longest
estimated remaining time.

Heavy rows apart: when the rows' needs (prompt plus max_tokens) are known up front, the rows that
may decode far longer than the others (`RowBounds`, by blocks) must not start near the end, where
one alone sets the makespan. While the front of the queue is dealt, the heavy rows of the job's
last rows go out as units of heavy rows only, to instances that finish one in time (the fastest
near the end); the light rows of those ranges are dealt later without them. The heavy rows of a
unit given back go apart at once and are dealt first.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar

from hetbatch.scheduler.pacing import PACING
from hetbatch.scheduler.ranges import RangeSet
from hetbatch.scheduler.routing import UNLIMITED, LongRows

if TYPE_CHECKING:
    from hetbatch.scheduler.bounds import RowBounds
    from hetbatch.spec import SchedulerSpec

# Instances the end game and stealing look at: the soonest and the latest to finish.
_CANDIDATES = 8


@dataclass(frozen=True)
class SchedulerConfig:
    min_unit_rows: int = 16
    max_unit_rows: int = 4096
    factor: float = 2.0
    lease_timeout_s: float = 120.0
    max_leases_per_instance: int = 16
    rate_window_s: float = 60.0  # measured speed forgets with this time constant
    # A job's last row leaves an engine this many mean engine latencies after it entered (its
    # longest requests, up to max_tokens, run several times the mean); 0 turns the end game off.
    tail_latency_factor: float = 3.0
    asking_window_s: float = 5.0  # instances that asked for work this recently can take it
    refuse_margin: float = 0.25  # refuse only for an instance that finishes this much sooner
    rank_interval_s: float = 0.5  # how stale the ranking of instances by finish time may be
    # An instance given nothing asks again after `retry_s`; once many instances wait, after
    # longer, so that together they ask about `waiting_asks_per_s` times a second (at most
    # `max_retry_s` apart): 10,000 idle instances near the end must not flood the coordinator.
    retry_s: float = PACING.wait_s
    waiting_asks_per_s: float = 400.0
    max_retry_s: float = 30.0
    # Prefix order: an instance's next unit follows on from its last one (the rows after it
    # share its prefixes, which its engine holds), and an instance that cannot follow on
    # starts a lane of its own instead of taking the rows just after another's.
    follow_on: bool = False
    # Heavy rows apart (per-row needs known up front): an instance takes heavy rows while it
    # would finish one before the job's expected end with this margin (a heavy row's latency:
    # the instance's mean engine latency times the largest need over the mean need, times
    # tail_latency_factor), or when it is about the fastest to finish one.
    heavy_lead: float = 2.0
    # ... and the heavy rows of the job's last rows go out early, this many rows of them for
    # every row dealt from the front: the two meet at 1 / (1 + heavy_pull) of the rows.
    heavy_pull: float = 1.0

    @classmethod
    def from_spec(cls, spec: SchedulerSpec) -> SchedulerConfig:
        """The settings a job file gives (its `scheduler:` section); the rest as defaults."""
        return cls(
            min_unit_rows=spec.min_unit_rows,
            max_unit_rows=spec.max_unit_rows,
            factor=spec.factor,
            lease_timeout_s=spec.lease_timeout_s,
        )


@dataclass
class Lease:
    """Rows [start, end) handed to one instance until `deadline` unless renewed."""

    lease_id: int
    instance: str
    start: int
    end: int
    deadline: float
    submitted: int = -1
    done: int = 0
    release_to: int | None = None
    limit: int | None = None  # rows needing more than this are handed back
    above: int = 0  # a span of long rows: only its rows needing more context than this
    below: int = UNLIMITED  # ... and at most this
    final: bool = False  # long rows no live instance holds: written as row errors
    handed_at: int | None = None  # its rows needing more than this were handed back
    split: bool = False  # rows whose heavy rows are dealt apart: its light rows, or its heavy

    @property
    def routed(self) -> bool:
        """Whether it holds only some of its range's rows by the context they need (the light
        rows of split rows count as whole: dealt, stolen and re-dealt like any others)."""
        return (
            bool(self.above) or (self.below != UNLIMITED and not self.split)
            or self.handed_at is not None
        )

    def __post_init__(self) -> None:
        if self.submitted < 0:
            self.submitted = self.start

    @property
    def rows(self) -> int:
        return self.end - self.start

    @property
    def unfinished_rows(self) -> int:
        return max(self.rows - self.done, 0)


@dataclass
class InstanceState:
    instance_id: str
    planned_weight: float
    alive: bool = True
    leases: list[int] = field(default_factory=list)
    measured_rate: float | None = None
    last_commit_at: float | None = None
    concurrency: int | None = None  # requests the engine runs at once (max_num_seqs)
    window_rows: float = 0.0
    window_s: float = 0.0
    queued: int = 0  # unfinished rows of its leases
    last_heard_at: float = -math.inf  # its last request or heartbeat
    context: int = UNLIMITED  # tokens its engine holds (max_model_len)


@dataclass(frozen=True)
class Wait:
    """No lease: ask again in `seconds`, or never once the job is `done` (`Wait.DONE`)."""

    seconds: float = 0.0
    done: bool = False
    DONE: ClassVar[Wait]


Wait.DONE = Wait(done=True)


class CommitStatus(Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True)
class Release:
    """Ask an instance to give back the rows of `lease_id` from `cut` on (it may cut later)."""

    lease_id: int
    cut: int


@dataclass(frozen=True)
class HeartbeatReply:
    releases: list[Release]
    revoked: list[int]


class Scheduler:
    """Hands out row ranges of one job to instances of unequal, partly unknown speed."""

    def __init__(
        self,
        total_rows: int,
        config: SchedulerConfig | None = None,
        committed: Sequence[tuple[int, int]] = (),
        boundaries: Sequence[int] = (),
        bounds: RowBounds | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.bounds = bounds if bounds is not None and bounds.any_heavy else None
        self.long_rows = LongRows()  # spans of rows handed back for want of context
        # The largest context of instances expected but not joined yet (an engine still
        # starting): rows it would hold are not dealt as final before it comes.
        self.awaited_context = 0
        self.total_rows = total_rows
        self.committed = RangeSet(committed)
        self.pending = RangeSet([(0, total_rows)])
        for a, b in self.committed:
            self.pending.remove(a, b)
        self.boundaries = sorted(set(boundaries))
        self.instances: dict[str, InstanceState] = {}
        self.leases: dict[int, Lease] = {}
        # Lease ids by deadline, soonest first (deadlines are set at `now` plus a constant, and
        # `now` only grows), so that expiring costs O(lapsed leases), not O(leases), per tick.
        self._by_deadline: OrderedDict[int, None] = OrderedDict()
        self._latest_deadline = -math.inf
        self._deadlines_in_order = True
        self._next_lease_id = 1
        self._thief_of: dict[int, str] = {}  # lease asked to release -> instance that asked
        self._reserved: dict[str, tuple[int, int]] = {}  # released rows kept for the thief
        # Running sums, so that a decision costs O(1), not O(instances), on a large cluster.
        self._measured_rate_sum = 0.0  # over every measured instance
        self._measured_planned_sum = 0.0
        self._alive_measured_rate = 0.0  # over alive measured instances
        self._alive_unmeasured_planned = 0.0  # over alive instances not yet measured
        self._leased_unfinished = 0
        self._ranked: list[str] = []  # alive instances by finish time, refreshed now and then
        self._ranked_at = -math.inf
        self._waiting: set[str] = set()  # alive instances whose last request got nothing
        self._cursor: dict[str, int] = {}  # follow_on: where each instance's last unit ended
        self._cursor_count: dict[int, int] = {}  # instances whose cursor is at a position
        self._heavy_checked_at = -math.inf
        self._fastest_latency = 0.0  # mean engine latency of the fastest alive instance
        # Heavy rows apart: rows whose heavy rows run in units of their own are `split` (for
        # good); `_unsplit`, pending rows of the heavy blocks not split yet; `_heavy_waiting`,
        # split rows whose heavy rows wait to be dealt (again). Ranges, never rows.
        self._split, self._unsplit, self._heavy_waiting = RangeSet(), RangeSet(), RangeSet()
        self._heavy_region = RangeSet()
        self._whole_dealt = self._split_dealt = 0
        self._heavy_held = True  # whether some live engine's context holds a heavy row
        if self.bounds is not None:
            region = self.bounds.heavy_ranges
            self._heavy_region = RangeSet([(0, total_rows)] if region is None else region)
            for a, b in self._heavy_region:
                for piece in self.pending.pieces(a, b):
                    self._unsplit.add(*piece)

    # -- membership ---------------------------------------------------------------------------

    def join(
        self,
        instance_id: str,
        planned_weight: float,
        now: float,
        concurrency: int | None = None,
        context: int | None = None,
    ) -> None:
        """Register an instance (or re-register one that reconnects); `context` is the tokens
        (prompt plus output) its engine holds."""
        state = self.instances.get(instance_id)
        if state is None:
            state = InstanceState(instance_id, max(planned_weight, 1e-9), alive=False)
            self.instances[instance_id] = state
        self._set_alive(state, True)
        state.concurrency = concurrency or state.concurrency
        state.context = context or state.context

    def _set_alive(self, state: InstanceState, alive: bool) -> None:
        """Whether an instance counts toward the cluster's capacity (kept in running sums)."""
        if state.alive == alive:
            return
        sign = 1.0 if alive else -1.0
        if state.measured_rate is not None:
            self._alive_measured_rate += sign * state.measured_rate
        else:
            self._alive_unmeasured_planned += sign * state.planned_weight
        state.alive = alive
        if not alive:
            self._waiting.discard(state.instance_id)

    def leave(self, instance_id: str, now: float) -> list[Lease]:
        """An instance is gone: its leases go back to the queue at once."""
        state = self.instances.get(instance_id)
        if state is None:
            return []
        self._set_alive(state, False)
        return [self._return_lease(lid) for lid in list(state.leases)]

    # -- dealing ------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return (
            not self.pending and not self.leases and not self.long_rows
            and not self._heavy_waiting
        )

    def request(self, instance_id: str, now: float) -> Lease | Wait:
        """Give `instance_id` its next unit, or say why not (wait and ask again, or done)."""
        state = self.instances[instance_id]
        if self.done:
            return Wait.DONE
        if len(state.leases) >= self.config.max_leases_per_instance:
            return Wait(self.config.retry_s)  # busy, not idle: its commits free a place soon
        return self._deal(state, now)

    def _nothing_free(self, state: InstanceState) -> Wait:
        """Nothing for an instance that could take work: it waits longer the more instances
        wait, so that the waiting instances together ask about `waiting_asks_per_s` times a
        second. Whatever frees rows (a release, a lapsed or returned lease) is still found
        within a fraction of a second by one of them, and the end game of a cluster of
        thousands costs the coordinator hundreds of requests a second, not tens of thousands."""
        cfg = self.config
        self._waiting.add(state.instance_id)
        spread = len(self._waiting) / cfg.waiting_asks_per_s
        return Wait(min(cfg.max_retry_s, max(cfg.retry_s, spread)))

    def _deal(self, state: InstanceState, now: float) -> Lease | Wait:
        """Which rows an instance that may take more gets: what a thief stole for it, else a
        weighted-factoring share of the queue, else nothing (and a steal is planned).
        Baseline policies deal differently by overriding this."""
        instance_id = state.instance_id
        reserved = self._reserved.pop(instance_id, None)
        if reserved is not None and self.pending.contains(*reserved):
            self.pending.remove(*reserved)
            return self._issue_rows(instance_id, *reserved, now)
        state.last_heard_at = now
        self._set_alive(state, True)
        if self.long_rows and (lease := self._deal_long_rows(state, now)) is not None:
            return lease
        if self.bounds is not None and (lease := self._deal_heavy(state, now)) is not None:
            return lease
        if self._too_late(instance_id, now):
            return self._nothing_free(state)
        if not self.pending:
            self._plan_steal(instance_id, now)
            return self._nothing_free(state)
        start, end = self._cut_unit(self.unit_size(instance_id), self._unit_start(instance_id))
        return self._issue_rows(instance_id, start, end, now)

    def unit_size(self, instance_id: str) -> int:
        """Weighted factoring: this instance's share of the remaining rows, over `factor`."""
        cfg = self.config
        share = self.rate(instance_id) / self._total_rate()
        size = math.ceil(self.pending.total * share / cfg.factor)
        return max(cfg.min_unit_rows, min(cfg.max_unit_rows, size))

    def _cut_unit(self, size: int, at: int | None = None) -> tuple[int, int]:
        """A unit of about `size` rows from the first pending row, or from pending row `at`."""
        start, end = self.pending.first() if at is None else (at, self.pending.end_of(at))
        if self._split:  # split rows and rows with their heavy rows in never share a unit
            if self._split.contains(start, start + 1):
                end = min(end, self._split.end_of(start))
            else:
                end = min(end, self._split.next_start(start) or end)
        cut = self._align(start + size, start, end)
        if end - cut < self.config.min_unit_rows:
            cut = end
        self.pending.remove(start, cut)
        return start, cut

    def _align(self, cut: int, start: int, end: int) -> int:
        """Move a cut to a nearby row-group boundary, so that units read whole row groups."""
        if cut >= end:
            return end
        slack = max((cut - start) // 8, 1)
        lo = bisect.bisect_left(self.boundaries, cut - slack)
        for b in self.boundaries[lo : lo + 3]:
            if start < b < end and abs(b - cut) <= slack:
                return b
        return cut

    def _issue_rows(self, instance_id: str, start: int, end: int, now: float) -> Lease:
        """A unit of queued rows: of split rows only their light rows (below the heavy bound),
        else every row (their heavy rows with them)."""
        lease = self._issue(instance_id, start, end, now)
        if self.bounds is not None:
            if self._split.overlaps(start, end):
                lease.below, lease.split = self.bounds.heavy_bound, True
            else:
                self._unsplit.remove(start, end)
                self._whole_dealt += end - start
        return lease

    def _issue(self, instance_id: str, start: int, end: int, now: float) -> Lease:
        lease = Lease(self._next_lease_id, instance_id, start, end, -math.inf)
        self._next_lease_id += 1
        self.leases[lease.lease_id] = lease
        self._renew(lease, now + self.config.lease_timeout_s)
        state = self.instances[instance_id]
        state.leases.append(lease.lease_id)
        self._add_queued(state, lease.rows)
        if self.config.follow_on:
            self._move_cursor(instance_id, end)
        self._waiting.discard(instance_id)
        if state.last_commit_at is None:
            state.last_commit_at = now
        return lease

    # -- following on (prefix order) ----------------------------------------------------------

    def _unit_start(self, instance_id: str) -> int | None:
        """Where an instance's next unit starts: None (the first pending row) unless
        `follow_on`; then right after its last unit while those rows wait, else a lane
        start (`_lane_start`)."""
        if not self.config.follow_on:
            return None
        cursor = self._cursor.get(instance_id)
        if cursor is not None and self.pending.contains(cursor, cursor + 1):
            return cursor
        return self._lane_start()

    def _lane_start(self) -> int:
        """The first pending stretch that no instance is about to follow on into; when every
        stretch has one, the middle of the longest (at a window boundary near it), so that
        two instances do not take turns at the same rows' prefixes. Looks at a bounded
        number of stretches: O(1) per decision however fragmented the queue."""
        best: tuple[int, int] | None = None
        for start, end in itertools.islice(self.pending, _CANDIDATES * 8):
            if not self._cursor_count.get(start):
                return start
            if best is None or end - start > best[1] - best[0]:
                best = (start, end)
        assert best is not None
        start, end = best
        if end - start < 2 * self.config.min_unit_rows:
            return start
        mid = (start + end) // 2
        return self._align(mid, start + self.config.min_unit_rows, end)

    def _move_cursor(self, instance_id: str, position: int) -> None:
        old = self._cursor.get(instance_id)
        if old is not None:
            left = self._cursor_count[old] - 1
            if left:
                self._cursor_count[old] = left
            else:
                del self._cursor_count[old]
        self._cursor[instance_id] = position
        self._cursor_count[position] = self._cursor_count.get(position, 0) + 1

    # -- heavy rows apart ----------------------------------------------------------------------

    def _deal_heavy(self, state: InstanceState, now: float) -> Lease | None:
        """A unit of heavy rows only (needing more than the heavy bound), for an instance that
        would finish them in time: first those waiting to be dealt again, then, paced against
        the rows dealt from the front, those of the job's last rows not dealt yet (their range
        becomes split: its light rows are dealt later, without them)."""
        bounds, cfg = self.bounds, self.config
        assert bounds is not None
        if not (self._heavy_waiting or self._unsplit):
            return None
        self._refresh_heavy(now)
        if state.context <= bounds.heavy_bound:
            if self._heavy_waiting and not self._heavy_held:
                # No live engine holds a heavy row: they wait with rows handed back for want of
                # context (dealt to an engine that joins, else written as row errors).
                for start, end in list(self._heavy_waiting):
                    self.long_rows.add(start, end, bounds.heavy_bound)
                self._heavy_waiting = RangeSet()
            return None
        if not self._takes_heavy(state, now):
            return None
        size = self.unit_size(state.instance_id)
        if self._heavy_waiting:
            start, end = self._heavy_waiting.first()
            end = min(end, start + size)
            self._heavy_waiting.remove(start, end)
        elif self._unsplit and self._split_dealt < cfg.heavy_pull * self._whole_dealt:
            start, end = self._unsplit.last()
            if end - start > size + cfg.min_unit_rows:
                start = self._align(end - size, start + cfg.min_unit_rows, end)
            self._unsplit.remove(start, end)
            self._split.add(start, end)
            self._split_dealt += end - start
        else:
            return None
        lease = self._issue(state.instance_id, start, end, now)
        lease.above, lease.split = bounds.heavy_bound, True
        return lease

    def _takes_heavy(self, state: InstanceState, now: float) -> bool:
        """Whether heavy rows may go to this instance: it would finish one before the job's
        expected end (with `heavy_lead` to spare), or it is about the fastest to finish one."""
        cfg, bounds = self.config, self.bounds
        if bounds is None or state.concurrency is None:
            return True
        self._refresh_heavy(now)
        rate = self.rate(state.instance_id)
        mine = state.concurrency / rate
        heavy_s = cfg.heavy_lead * cfg.tail_latency_factor * bounds.heavy_over_mean * mine
        job_left = (self.pending.total + self._leased_unfinished) / self._total_rate()
        if state.queued / rate + heavy_s <= job_left:
            return True
        return mine <= (1 + cfg.refuse_margin) * self._fastest_latency

    def _refresh_heavy(self, now: float) -> None:
        """The fastest latency of the live engines that hold heavy rows, and whether there is
        one: O(instances), at most every `rank_interval_s`."""
        if now - self._heavy_checked_at < self.config.rank_interval_s:
            return
        self._heavy_checked_at = now
        bound = self.bounds.heavy_bound if self.bounds is not None else 0
        holders = [(i, s) for i, s in self.instances.items() if s.alive and s.context > bound]
        self._heavy_held = bool(holders)
        self._fastest_latency = min(
            (s.concurrency / self.rate(i) for i, s in holders if s.concurrency is not None),
            default=0.0,
        )

    def _context_now(self, state: InstanceState, now: float) -> int:
        """The longest rows this instance may be dealt now: its context, lowered to the heavy
        bound for an instance that would not finish a heavy row in time."""
        if self.bounds is None or self._takes_heavy(state, now):
            return state.context
        return min(state.context, self.bounds.heavy_bound)

    # -- rows by context ----------------------------------------------------------------------

    def _deal_long_rows(self, state: InstanceState, now: float) -> Lease | None:
        """A span of long rows this instance's context holds, the longest first; at the end,
        long rows no live instance holds, dealt as final (their worker writes row errors)."""
        key = self.long_rows.largest_below(self._context_now(state, now))
        final = False
        if key is None:
            key = self.long_rows.largest()
            largest = max((s.context for s in self.instances.values() if s.alive), default=0)
            if (self.pending or key[0] < largest or key[0] < self.awaited_context
                    or state.context < largest):  # the largest context runs what it can
                return None
            final = True
        span = self.long_rows.cut(key, self.config.max_unit_rows)
        lease = self._issue(state.instance_id, span.start, span.end, now)
        lease.above, lease.below, lease.final = span.above, span.below, final
        return lease

    def hand_back(self, instance_id: str, lease_id: int, now: float) -> None:
        """The worker of a live lease found rows in it too long for its context (or above the
        lease's limit): they wait as a span for an instance that holds them."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.instance != instance_id or lease.final:
            return
        top = min(self.instances[instance_id].context, lease.limit or UNLIMITED)
        if lease.handed_at is not None or top <= lease.above or top >= lease.below:
            return
        lease.handed_at = top
        self.long_rows.add(lease.start, lease.end, top, lease.below)

    def _requeue(self, lease: Lease, start: int, end: int) -> None:
        """Rows of a lease given back go where they came from: the queue, or their span (less
        the rows it handed back, which wait in a span of their own)."""
        if lease.split and lease.above and lease.handed_at is None:
            self._heavy_waiting.add(start, end)  # heavy rows: dealt again first
            return
        if not lease.routed:
            self.pending.add(start, end)
            if self.bounds is not None and not lease.split:
                # Its heavy rows go apart now, to be dealt first; its light rows queue.
                for a, b in self._heavy_region.pieces(start, end):
                    self._split.add(a, b)
                    self._heavy_waiting.add(a, b)
            return
        below = lease.below if lease.handed_at is None else lease.handed_at
        self.long_rows.add(start, end, lease.above, below)

    def _commit_long_rows(
        self, instance_id: str, lease: Lease | None, start: int, end: int, now: float,
        handed_back: bool,
    ) -> CommitStatus:
        """A unit that handed rows back, or a span of long rows: only a live lease counts (a
        late one's rows are dealt again), and a span's rows do not measure the speed."""
        if lease is None or lease.instance != instance_id or (start, end) != (
            lease.start, lease.end
        ):
            return CommitStatus.DUPLICATE if self.committed.contains(start, end) else (
                CommitStatus.STALE
            )
        if handed_back:
            self.hand_back(instance_id, lease.lease_id, now)
        self.leases.pop(lease.lease_id)
        del self._by_deadline[lease.lease_id]
        state = self.instances[instance_id]
        state.leases.remove(lease.lease_id)
        self._add_queued(state, -lease.unfinished_rows)
        self.committed.add(start, end)
        if not lease.above:
            self._measure(instance_id, end - start, now)
        return CommitStatus.ACCEPTED

    # -- stealing -----------------------------------------------------------------------------

    def latency(self, instance_id: str) -> float | None:
        """Seconds a row spends in this instance's engine (Little's law: concurrency over
        rows/s), once its speed has been measured."""
        state = self.instances[instance_id]
        if state.concurrency is None or state.measured_rate is None:
            return None
        return state.concurrency / state.measured_rate

    def _too_late(self, instance_id: str, now: float) -> bool:
        """End game: refuse new rows to an instance when another instance that is asking for
        work would finish the same unit clearly sooner (by `refuse_margin`, so that two close
        instances do not refuse each other in turn while both wait).

        A row's last token comes a whole engine latency after it enters; on an instance with a
        deep batch and a slow step that latency is long, so the last rows of a job belong on the
        instances that turn a unit around soonest, not on whichever asks first. Before the end
        (when everyone's queue outlasts the job's remaining work) nobody is refused.
        """
        cfg = self.config
        me = self.instances[instance_id]
        if cfg.tail_latency_factor <= 0 or me.concurrency is None or me.measured_rate is None:
            return False
        # finish_time (plus a unit's rows) written out for measured instances: this runs on
        # every request of the end game, from every instance.
        tail = cfg.tail_latency_factor
        unfinished = self.pending.total + self._leased_unfinished
        if (me.queued + tail * me.concurrency) / me.measured_rate <= (
            unfinished / self._total_rate()
        ):
            return False
        size = min(self.unit_size(instance_id), self.pending.total or 1)
        bar = (1 - cfg.refuse_margin) * (
            (me.queued + size + tail * me.concurrency) / me.measured_rate
        )
        recent = now - cfg.asking_window_s
        candidates = (self.instances[i] for i in self._ranking(now) if i != instance_id)
        return any(
            s.alive and s.last_heard_at >= recent
            and s.concurrency is not None and s.measured_rate is not None
            and len(s.leases) < cfg.max_leases_per_instance
            and (s.queued + size + tail * s.concurrency) / s.measured_rate < bar
            for s in itertools.islice(candidates, _CANDIDATES)
        )

    def _ranking(self, now: float) -> list[str]:
        """Alive instances, soonest to finish first; recomputed at most every
        `rank_interval_s`, so the end game costs O(instances) per interval, not per call."""
        if now - self._ranked_at >= self.config.rank_interval_s:
            # finish_time written out: this sorts every instance of a cluster of thousands.
            tail = self.config.tail_latency_factor
            scale = (
                self._measured_rate_sum / self._measured_planned_sum
                if self._measured_planned_sum else 1.0
            )
            keyed = []
            for i, s in self.instances.items():
                if not s.alive:
                    continue
                rate = s.measured_rate
                if rate is None:
                    keyed.append((s.queued / (s.planned_weight * scale), i))
                elif s.concurrency is None:
                    keyed.append((s.queued / rate, i))
                else:
                    keyed.append((s.queued / rate + tail * (s.concurrency / rate), i))
            keyed.sort()
            self._ranked = [i for _, i in keyed]
            self._ranked_at = now
        return self._ranked

    def finish_time(self, instance_id: str) -> float:
        """Seconds until this instance's last row is out: its queue, then one engine latency
        (of a long request) for the row that entered last."""
        lat = self.latency(instance_id) or 0.0
        return self.remaining_time(instance_id) + self.config.tail_latency_factor * lat

    def remaining_time(self, instance_id: str) -> float:
        return self.instances[instance_id].queued / self.rate(instance_id)

    def _plan_steal(self, thief: str, now: float) -> Release | None:
        """Mark the unstarted tail of the slowest-to-finish instance for release to the queue."""
        ranked = (self.instances[i] for i in reversed(self._ranking(now)) if i != thief)
        victims = [s for s in itertools.islice(ranked, _CANDIDATES) if s.alive and s.leases]
        thief_rate = self.rate(thief)
        thief_left = self.finish_time(thief)
        for victim in victims:
            lease = self.leases[victim.leases[-1]]
            if lease.release_to is not None or lease.routed:
                continue
            v_rate = self.rate(victim.instance_id)
            v_left = self.finish_time(victim.instance_id)
            if v_left <= thief_left:
                continue
            # Both finish together: (v_left - x / v_rate) == thief_left + x / thief_rate.
            take = (v_left - thief_left) * v_rate * thief_rate / (v_rate + thief_rate)
            cut = max(lease.end - int(take), lease.submitted)
            if lease.end - cut < self.config.min_unit_rows:
                continue
            lease.release_to = cut
            self._thief_of[lease.lease_id] = thief
            return Release(lease.lease_id, cut)
        return None

    def release(self, instance_id: str, lease_id: int, cut: int, now: float) -> None:
        """The owner gives back rows [cut, end) of a lease (all of it when cut == start)."""
        lease = self.leases.get(lease_id)
        if lease is None or lease.instance != instance_id:
            return
        cut = min(max(cut, lease.start), lease.end)
        lease.release_to = None
        thief = self._thief_of.pop(lease_id, None)
        if thief is not None and cut < lease.end:
            self._reserved[thief] = (cut, lease.end)
        if cut == lease.start:
            self._return_lease(lease_id)
            return
        self._requeue(lease, cut, lease.end)
        before = lease.unfinished_rows
        lease.end = cut
        self._add_queued(self.instances[instance_id], lease.unfinished_rows - before)

    # -- liveness -----------------------------------------------------------------------------

    def heartbeat(
        self, instance_id: str, progress: dict[int, tuple[int, int]], now: float
    ) -> HeartbeatReply:
        """Renew the instance's leases, note its progress (submitted, done), pass on releases."""
        state = self.instances[instance_id]
        if not state.alive:
            self._set_alive(state, True)
        state.last_heard_at = now
        mine = state.leases
        revoked = [lid for lid in progress if lid not in mine]
        releases = []
        deadline = now + self.config.lease_timeout_s
        self._note_deadline(deadline)
        # Written out (renewal, progress, queue length): every instance heartbeats all along.
        by_deadline, leases = self._by_deadline, self.leases
        queued_change = 0
        for lid in mine:
            lease = leases[lid]
            lease.deadline = deadline
            by_deadline.move_to_end(lid)
            reported = progress.get(lid)
            if reported is not None:
                submitted, done = reported
                start, end = lease.start, lease.end
                rows = end - start
                lease.submitted = (
                    start if submitted < start else end if submitted > end else submitted
                )
                before = rows - lease.done
                lease.done = done = done if done < rows else rows
                queued_change += (rows - done if done < rows else 0) - (before if before > 0 else 0)
            if lease.release_to is not None:
                releases.append(Release(lid, max(lease.release_to, lease.submitted)))
        if queued_change:
            self._add_queued(state, queued_change)
        return HeartbeatReply(releases, revoked)

    def _renew(self, lease: Lease, deadline: float) -> None:
        lease.deadline = deadline
        self._note_deadline(deadline)
        self._by_deadline[lease.lease_id] = None
        self._by_deadline.move_to_end(lease.lease_id)

    def _note_deadline(self, deadline: float) -> None:
        """A lease renewed to `deadline` moves to the end of `_by_deadline`, which stays sorted
        unless a clock went back: then `expire` sorts it again."""
        if deadline < self._latest_deadline:
            self._deadlines_in_order = False
        else:
            self._latest_deadline = deadline

    def expire(self, now: float) -> list[Lease]:
        """Leases not renewed in time go back to the queue."""
        if not self._deadlines_in_order:
            order = sorted(self._by_deadline, key=lambda lid: self.leases[lid].deadline)
            self._by_deadline = OrderedDict.fromkeys(order)
            self._deadlines_in_order = True
        lapsed = list(itertools.takewhile(
            lambda lid: self.leases[lid].deadline < now, self._by_deadline
        ))
        for lid in lapsed:
            # Silent past its lease: count it out of the cluster's capacity until it speaks.
            self._set_alive(self.instances[self.leases[lid].instance], False)
        return [self._return_lease(lid) for lid in lapsed]

    def _return_lease(self, lease_id: int) -> Lease:
        lease = self.leases.pop(lease_id)
        del self._by_deadline[lease_id]
        state = self.instances[lease.instance]
        state.leases.remove(lease_id)
        self._add_queued(state, -lease.unfinished_rows)
        self._requeue(lease, lease.start, lease.end)
        return lease

    def _add_queued(self, state: InstanceState, rows: int) -> None:
        state.queued += rows
        self._leased_unfinished += rows

    # -- commits ------------------------------------------------------------------------------

    def commit(
        self,
        instance_id: str,
        lease_id: int,
        start: int,
        end: int,
        now: float,
        handed_back: bool = False,
    ) -> CommitStatus:
        """Accept a finished unit exactly once.

        A commit of a live lease is accepted. A late commit of a lapsed lease is accepted too if
        its rows are all still waiting in the queue (nobody else took them), so a slow worker's
        work is not thrown away; otherwise it is stale and its shard must be discarded.
        `handed_back`: the unit's rows too long for this instance's context were not run.
        """
        lease = self.leases.get(lease_id)
        if handed_back or (lease is not None and lease.routed):
            return self._commit_long_rows(instance_id, lease, start, end, now, handed_back)
        if (
            lease is not None
            and lease.instance == instance_id
            and (start, end)
            == (
                lease.start,
                lease.end,
            )
        ):
            self.leases.pop(lease_id)
            del self._by_deadline[lease_id]
            state = self.instances[instance_id]
            state.leases.remove(lease_id)
            self._add_queued(state, -lease.unfinished_rows)
        elif self.committed.contains(start, end):
            return CommitStatus.DUPLICATE
        elif self._split.overlaps(start, end):
            # Its heavy rows went apart since: whole, they would run twice.
            return CommitStatus.STALE
        elif self.pending.contains(start, end):
            self.pending.remove(start, end)
            self._unsplit.remove(start, end)
        else:
            return CommitStatus.STALE
        self.committed.add(start, end)
        self._measure(instance_id, end - start, now)
        return CommitStatus.ACCEPTED

    # -- capacity -----------------------------------------------------------------------------

    def _measure(self, instance_id: str, rows: int, now: float) -> None:
        """Correct the instance's capacity from the rows/s it really achieves.

        Rows and elapsed time are summed with an exponential decay, so commits that arrive in
        a burst add their rows without dividing by a near-zero interval, and the estimate
        follows an instance that slows down within about `rate_window_s`.
        """
        state = self.instances.get(instance_id)
        if state is None:
            return
        since = state.last_commit_at if state.last_commit_at is not None else now
        state.last_commit_at = now
        dt = max(now - since, 0.0)
        keep = math.exp(-dt / self.config.rate_window_s)
        state.window_rows = state.window_rows * keep + rows
        state.window_s = state.window_s * keep + dt
        if state.window_s <= 0:
            return
        prev = state.measured_rate
        state.measured_rate = state.window_rows / state.window_s
        self._measured_rate_sum += state.measured_rate - (prev or 0.0)
        if prev is None:
            self._measured_planned_sum += state.planned_weight
        if state.alive:
            self._alive_measured_rate += state.measured_rate - (prev or 0.0)
            if prev is None:
                self._alive_unmeasured_planned -= state.planned_weight

    def rate(self, instance_id: str) -> float:
        """Estimated rows/s: measured when known, else the planned weight scaled to the
        measured instances (relative weights only, before any measurement)."""
        state = self.instances[instance_id]
        if state.measured_rate is not None:
            return state.measured_rate
        if not self._measured_planned_sum:
            return state.planned_weight
        return state.planned_weight * self._measured_rate_sum / self._measured_planned_sum

    def _total_rate(self) -> float:
        scale = (
            self._measured_rate_sum / self._measured_planned_sum
            if self._measured_planned_sum else 1.0
        )
        return (self._alive_measured_rate + scale * self._alive_unmeasured_planned) or 1.0
