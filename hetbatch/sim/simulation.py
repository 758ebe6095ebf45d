"""A discrete-event simulation of a job: simulated clock, simulated instances, the real Scheduler.

Instances talk to the scheduler through the calls the coordinator makes for its workers (join,
request, heartbeat, release, commit, leave, expire) and behave as the worker loop does, paced by
the same `Pacing` object: hold up to `max_units` units, ask for the next one when fewer rows than
the worker's window are left unsubmitted, heartbeat with (submitted, done) per lease, cut
released units at max(cut, submitted).

Each instance is a continuously batching engine: a step takes about the same time whatever the
batch, so tokens/s grow with the requests in flight up to `max_num_seqs`, where the instance runs
at its peak `speed`. Units are simulated whole, not per token: a unit of rows occupies the
instance's pipeline for (its work / speed), queued behind the units before it, and cannot finish
before its last request has decoded, one token per step, after entering the batch. That keeps a
job of millions of rows on a thousand instances to a few events per unit, so the scheduler's own
decisions dominate the cost.
"""

from __future__ import annotations

import bisect
import copy
import heapq
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from hetbatch.scheduler.core import CommitStatus, Lease, Scheduler
from hetbatch.scheduler.pacing import PACING, Pacing
from hetbatch.sim.workload import RowWork

if TYPE_CHECKING:
    from hetbatch.planner.replan import Replan, Replanner
    from hetbatch.planner.types import DeployConfig

JOIN, REQUEST, COMMIT, HEARTBEAT, LOSE, TICK, REPLAN = range(7)


@dataclass(frozen=True)
class SimInstance:
    """One simulated instance: planned capacity (what the scheduler is told) and actual speed,
    both in output tokens/s at a full batch."""

    instance_id: str
    planned_weight: float
    speed: float
    max_num_seqs: int = 256
    join_at: float = 0.0
    lost_at: float | None = None
    pool: str = ""
    step_s: float | None = None  # decode step of the last requests; default max_num_seqs/speed
    context: int | None = None  # tokens its engine holds (max_model_len); None: any row


@dataclass(frozen=True)
class SimConfig:
    heartbeat_s: float = 1.0
    pacing: Pacing = PACING  # the worker's and the coordinator's, not a copy
    poll_s: float = 0.1  # the soonest an instance re-checks whether it wants another unit
    loss: str = "leave"  # "leave": the connection drops; "timeout": only lease expiry notices
    record: bool = True
    max_time: float = 1e9


@dataclass
class SimReplan:
    """Re-planning in the simulator: the `Replanner` the coordinator runs, asked every
    `check_s` with the instances' figures (work counted as output tokens). A re-planned pool's
    instances take no new units, give back those not started, finish the rest, are down for
    `restart_s` (an engine start-up) and come back at `speed_of(pool, config)`: the simulated
    truth of the new configuration, as (tokens/s, max_num_seqs)."""

    replanner: Replanner
    speed_of: Callable[[str, DeployConfig], tuple[float, int]]
    check_s: float = 5.0
    restart_s: float = 20.0
    input_len: float = 0.0  # mean prompt tokens per row, for the figures
    events: list[tuple[float, Replan]] = field(default_factory=list)


def poll_interval(step_seconds: Iterable[float]) -> float:
    """A `poll_s` for instances of these engine steps: a worker re-checks once per step, so a
    fast instance with short units asks for the next one before its last one drains; kept
    within 5 ms (events cost) and the 0.1 s default."""
    return min(max(min(step_seconds, default=0.1), 0.005), 0.1)


@dataclass(frozen=True)
class Assignment:
    """A committed unit: rows [row0, row1) ran on `instance` from `start` to `end`."""

    instance: str
    start: float
    end: float
    row0: int
    row1: int
    above: int = 0  # only its rows needing more context than this (a span of long rows)
    final: bool = False  # rows its instance could not hold were written as errors
    limit: int | None = None  # its rows needing more than this were handed back
    below: int = 1 << 62  # ... and at most this


@dataclass(frozen=True)
class InstanceStats:
    busy_s: float
    idle_s: float
    rows: int
    units: int


@dataclass(frozen=True)
class SimResult:
    completed: bool
    makespan: float
    total_rows: int
    total_work: float
    lower_bound: float
    instances: dict[str, InstanceStats]
    assignments: list[Assignment]
    scheduler_calls: int
    scheduler_s: float  # CPU time inside the scheduler's calls

    @property
    def efficiency(self) -> float:
        return self.lower_bound / self.makespan if self.makespan > 0 else 1.0

    @property
    def rows_per_s(self) -> float:
        return self.total_rows / self.makespan if self.makespan > 0 else 0.0

    @property
    def work_per_s(self) -> float:
        return self.total_work / self.makespan if self.makespan > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "completed": self.completed,
            "makespan_s": round(self.makespan, 3),
            "rows": self.total_rows,
            "rows_per_s": round(self.rows_per_s, 3),
            "tokens_per_s": round(self.work_per_s, 1),
            "lower_bound_s": round(self.lower_bound, 3),
            "efficiency": round(self.efficiency, 4),
            "scheduler_calls": self.scheduler_calls,
            "instances": {
                k: {"busy_s": round(v.busy_s, 3), "idle_s": round(v.idle_s, 3),
                    "rows": v.rows, "units": v.units}
                for k, v in self.instances.items()
            },
        }


@dataclass
class _Unit:
    lease_id: int
    start: int
    end: int
    granted: float
    t_start: float = 0.0
    t_end: float = 0.0
    done_at: float = 0.0
    version: int = 0
    above: int = 0  # a span of long rows (Lease.above, Lease.below)
    below: int = 1 << 62
    limit: int | None = None  # rows needing more are handed back (Lease.limit)
    final: bool = False


@dataclass
class _Inst:
    spec: SimInstance
    step_s: float
    alive: bool = False
    finished: bool = False
    units: list[_Unit] = field(default_factory=list)
    free_at: float = 0.0
    busy_s: float = 0.0
    rows: int = 0
    n_units: int = 0
    request_token: int = 0
    next_lease_at: float = 0.0  # told to wait until then, it does not ask before
    life: int = 0  # bumped by a restart: events of an earlier life are ignored
    tokens: float = 0.0  # work of its accepted units
    first_lease_at: float | None = None
    last_commit_at: float | None = None
    relayout: tuple[float, int] | None = None  # draining to restart at (speed, max_num_seqs)


def fluid_lower_bound(instances: list[SimInstance], work: float) -> float:
    """The earliest time `work` could be done if it flowed freely to every instance while it is
    up, at its actual speed."""
    events = sorted(
        {0.0, *(i.join_at for i in instances), *(i.lost_at for i in instances if i.lost_at)}
    )
    done, t = 0.0, 0.0
    for k, t in enumerate(events):
        nxt = events[k + 1] if k + 1 < len(events) else math.inf
        cap = sum(i.speed for i in instances if i.join_at <= t and (i.lost_at or math.inf) > t)
        if cap > 0 and done + cap * (nxt - t) >= work:
            return t + (work - done) / cap
        if not math.isinf(nxt):
            done += cap * (nxt - t)
    return math.inf


class Simulation:
    """One run of `scheduler` over `work` on `instances`."""

    def __init__(
        self,
        scheduler: Scheduler,
        instances: list[SimInstance],
        work: RowWork,
        config: SimConfig | None = None,
        trace: list[tuple[str, tuple, object]] | None = None,
        replan: SimReplan | None = None,
    ) -> None:
        if work.rows != scheduler.total_rows:
            raise ValueError("the workload and the scheduler disagree on the number of rows")
        self.s = scheduler
        self.cfg = config or SimConfig()
        self.work = work
        self.specs = instances
        self.insts = [_Inst(i, i.step_s or i.max_num_seqs / i.speed) for i in instances]
        self.by_id = {i.instance_id: k for k, i in enumerate(instances)}
        self.alive_count = 0
        self.join_times = sorted(i.join_at for i in instances)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.calls = 0
        self.sched_s = 0.0
        self.assignments: list[Assignment] = []
        self.trace = trace  # every scheduler call (name, args, result), to replay elsewhere
        self.replan = replan

    # -- the event loop -----------------------------------------------------------------------

    def _push(self, t: float, kind: int, idx: int, token: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, idx, token))

    def _call(self, fn, *args):
        """A scheduler decision, timed: it is the cost a simulation of scale measures. CPU time
        of this thread, so that other processes on a shared machine do not count."""
        t0 = time.thread_time()
        out = fn(*args)
        self.sched_s += time.thread_time() - t0
        self.calls += 1
        if self.trace is not None:  # a copy: the scheduler changes a lease it handed out later
            self.trace.append((fn.__name__, args, copy.copy(out)))
        return out

    def run(self) -> SimResult:
        for k, spec in enumerate(self.specs):
            self._push(spec.join_at, JOIN, k)
            if spec.lost_at is not None:
                self._push(spec.lost_at, LOSE, k)
        self._push(self.cfg.pacing.expire_tick_s, TICK, -1)
        if self.replan is not None:
            self._push(self.replan.check_s, REPLAN, -1)
        handlers = {
            JOIN: self._on_join, REQUEST: self._on_request, COMMIT: self._on_commit,
            HEARTBEAT: self._on_heartbeat, LOSE: self._on_lose, TICK: self._on_tick,
            REPLAN: self._on_replan,
        }
        while self.heap and not self.s.done:
            t, _, kind, idx, token = heapq.heappop(self.heap)
            if t > self.cfg.max_time:
                break
            self.now = t
            handlers[kind](idx, token)
        return self._result()

    def _on_join(self, k: int, _: int) -> None:
        inst = self.insts[k]
        inst.alive, inst.free_at = True, self.now
        self.alive_count += 1
        self._call(self.s.join, inst.spec.instance_id, inst.spec.planned_weight, self.now,
                   inst.spec.max_num_seqs, *_given(inst.spec.context))
        self._want_lease(k, self.now)
        self._push(self.now + self.cfg.heartbeat_s, HEARTBEAT, k, inst.life)

    def _on_lose(self, k: int, _: int) -> None:
        inst = self.insts[k]
        if not inst.alive:
            return
        inst.alive = False
        self.alive_count -= 1
        for u in inst.units:
            if u.t_start < self.now:
                inst.busy_s += min(u.t_end, self.now) - u.t_start
        inst.units.clear()
        if self.cfg.loss == "leave":
            self._call(self.s.leave, inst.spec.instance_id, self.now)

    def _on_tick(self, _: int, __: int) -> None:
        self._call(self.s.expire, self.now)
        joining_later = bisect.bisect_right(self.join_times, self.now) < len(self.join_times)
        if self.alive_count or joining_later:  # else nobody is left to work
            self._push(self.now + self.cfg.pacing.expire_tick_s, TICK, -1)

    # -- asking for work ----------------------------------------------------------------------

    def _want_lease(self, k: int, t: float) -> None:
        inst = self.insts[k]
        inst.request_token += 1
        self._push(max(t, inst.next_lease_at), REQUEST, k, inst.request_token)

    def _window(self, inst: _Inst) -> int:
        return self.cfg.pacing.window(inst.spec.max_num_seqs)

    def _unsubmitted(self, inst: _Inst) -> int:
        return sum(u.end - self._progress(inst, u)[0] for u in inst.units)

    def _on_request(self, k: int, token: int) -> None:
        inst = self.insts[k]
        if not inst.alive or inst.finished or token != inst.request_token or inst.relayout:
            return
        if len(inst.units) >= self.cfg.pacing.max_units:
            return  # asked again when a unit commits
        if inst.units and self._unsubmitted(inst) > self._window(inst):
            self._want_lease(k, self._when_low(inst))
            return
        result = self._call(self.s.request, inst.spec.instance_id, self.now)
        if isinstance(result, Lease):
            if inst.first_lease_at is None:
                inst.first_lease_at = self.now
            unit = _Unit(result.lease_id, result.start, result.end, self.now,
                         above=result.above, below=result.below, final=result.final,
                         limit=result.limit)
            self._hand_back(inst, unit)
            inst.units.append(unit)
            self._schedule(k, len(inst.units) - 1)
            self._want_lease(k, self.now)
        elif result.done:
            inst.finished = True
        else:  # as the worker does: no request before the wait is over, unless a unit commits
            inst.next_lease_at = self.now + result.seconds
            self._want_lease(k, inst.next_lease_at)

    def _when_low(self, inst: _Inst) -> float:
        """When the queued rows will have dropped to the worker's window (it asks then)."""
        last = inst.units[-1]
        per_row = (last.t_end - last.t_start) / max(last.end - last.start, 1)
        # Never sooner than a short poll: the estimate from the last unit alone can lag the
        # sum over all units, and a zero step would spin the event loop.
        return max(self.now + self.cfg.poll_s, last.t_end - self._window(inst) * per_row)

    # -- running units ------------------------------------------------------------------------

    def _schedule(self, k: int, first: int) -> None:
        """(Re)time units from index `first` on: each queues behind the one before it."""
        inst = self.insts[k]
        for i in range(first, len(inst.units)):
            u = inst.units[i]
            if not (u.version and u.t_start <= self.now):  # a running unit keeps its start
                prev = inst.units[i - 1].t_end if i > 0 else inst.free_at
                u.t_start = max(u.granted, prev)
            if self.work.needs is None:
                u.t_end = u.t_start + self.work.cost(u.start, u.end) / inst.spec.speed
                floor = u.t_start + self.work.drain_s(u.start, u.end, inst.spec.speed, inst.step_s)
            else:
                run_s, drain_s = self._run_fitting(inst, u)
                u.t_end, floor = u.t_start + run_s, u.t_start + drain_s
            u.done_at = max(u.t_end, floor, self.now)
            u.version += 1
            self._push(u.done_at, COMMIT, k, u.lease_id * 1024 + (u.version % 1024))

    def _top(self, inst: _Inst, u: _Unit) -> int:
        return min(inst.spec.context or (1 << 62), u.limit or (1 << 62))

    def _hand_back(self, inst: _Inst, u: _Unit) -> None:
        """As the worker, once it has read a unit: rows too long for it are handed back."""
        if self.work.needs is None or u.final:
            return
        top = self._top(inst, u)
        if top > u.above and self.work.hands_back(u.start, u.end, u.below, top):
            self._call(self.s.hand_back, inst.spec.instance_id, u.lease_id, self.now)

    def _run_fitting(self, inst: _Inst, u: _Unit) -> tuple[float, float]:
        """A unit of a job whose rows need more context than some instances hold: only the
        rows this instance holds run (as its worker checks them), the others are handed back."""
        mask = self.work.rows_run(u.start, u.end, u.above, u.below, self._top(inst, u), u.final)
        return self.work.masked(u.start, u.end, mask, inst.spec.speed, inst.step_s)

    def _on_commit(self, k: int, token: int) -> None:
        inst = self.insts[k]
        lease_id, version = divmod(token, 1024)
        unit = next((u for u in inst.units if u.lease_id == lease_id), None)
        if not inst.alive or unit is None or unit.version % 1024 != version:
            return
        inst.units.remove(unit)
        inst.free_at = max(inst.free_at, unit.t_end)
        inst.busy_s += unit.t_end - unit.t_start
        status = self._call(
            self.s.commit, inst.spec.instance_id, lease_id, unit.start, unit.end, self.now
        )
        if status is CommitStatus.ACCEPTED:
            inst.rows += unit.end - unit.start
            inst.n_units += 1
            inst.tokens += self.work.cost(unit.start, unit.end)
            inst.last_commit_at = self.now
            if self.cfg.record:
                self.assignments.append(
                    Assignment(inst.spec.instance_id, unit.t_start, self.now, unit.start, unit.end,
                               unit.above, unit.final, unit.limit, unit.below)
                )
        inst.next_lease_at = self.now  # as the worker: a commit ends a wait, its queue changed
        if not self._restart_if_drained(k):
            self._want_lease(k, self.now)

    # -- heartbeats ---------------------------------------------------------------------------

    def _progress(self, inst: _Inst, u: _Unit) -> tuple[int, int]:
        """(submitted, done) rows of a unit now: rows run ahead of completion by a batch."""
        if u.t_start > self.now:
            return u.start, 0
        span = u.t_end - u.t_start
        frac = 1.0 if span <= 0 else min(1.0, (self.now - u.t_start) / span)
        rows = u.end - u.start
        processed = int(frac * rows)
        return u.start + min(rows, processed + inst.spec.max_num_seqs), processed

    def _on_heartbeat(self, k: int, life: int) -> None:
        inst = self.insts[k]
        if not inst.alive or inst.finished or life != inst.life:
            return
        now, batch = self.now, inst.spec.max_num_seqs
        progress = {}
        for u in inst.units:  # _progress written out: every instance heartbeats all along
            if u.t_start > now:
                progress[u.lease_id] = (u.start, 0)
                continue
            span, rows = u.t_end - u.t_start, u.end - u.start
            processed = int((1.0 if span <= 0 else min(1.0, (now - u.t_start) / span)) * rows)
            progress[u.lease_id] = (u.start + min(rows, processed + batch), processed)
        reply = self._call(self.s.heartbeat, inst.spec.instance_id, progress, self.now)
        for lid in reply.revoked:
            self._drop(k, lid)
        for rel in reply.releases:
            self._release(k, rel.lease_id, rel.cut)
        self._push(self.now + self.cfg.heartbeat_s, HEARTBEAT, k, inst.life)
        self._restart_if_drained(k)

    def _index(self, inst: _Inst, lease_id: int) -> int | None:
        return next((i for i, u in enumerate(inst.units) if u.lease_id == lease_id), None)

    def _drop(self, k: int, lease_id: int) -> None:
        inst = self.insts[k]
        i = self._index(inst, lease_id)
        if i is None:
            return
        u = inst.units.pop(i)
        if u.t_start < self.now:
            inst.busy_s += min(u.t_end, self.now) - u.t_start
            inst.free_at = max(inst.free_at, min(u.t_end, self.now))
        self._schedule(k, i)
        self._want_lease(k, self.now)

    def _release(self, k: int, lease_id: int, cut: int) -> None:
        inst = self.insts[k]
        i = self._index(inst, lease_id)
        if i is None:
            return
        u = inst.units[i]
        submitted = self._progress(inst, u)[0]
        cut = min(max(cut, submitted), u.end)
        self._call(self.s.release, inst.spec.instance_id, lease_id, cut, self.now)
        if cut == u.start:
            inst.units.pop(i)
        else:
            u.end = cut
        self._schedule(k, i)

    # -- re-planning ---------------------------------------------------------------------------

    def _on_replan(self, _: int, __: int) -> None:
        from hetbatch.planner.replan import InstanceFigures

        assert self.replan is not None
        figures = [
            InstanceFigures(
                i.spec.pool, i.n_units, (i.last_commit_at or 0.0) - (i.first_lease_at or 0.0),
                round(i.tokens), i.rows, round(i.rows * self.replan.input_len),
                concurrency=i.spec.max_num_seqs,
            )
            for i in self.insts if i.alive and i.relayout is None
        ]
        for decision in self.replan.replanner.check(figures):
            self.replan.events.append((self.now, decision))
            target = self.replan.speed_of(decision.pool, decision.new)
            for k, inst in enumerate(self.insts):
                if inst.alive and inst.spec.pool == decision.pool:
                    self._drain(k, target)
        if any(i.alive for i in self.insts):
            self._push(self.now + self.replan.check_s, REPLAN, -1)

    def _drain(self, k: int, target: tuple[float, int]) -> None:
        """Take no new units, give back the ones not started, restart once the rest are in."""
        inst = self.insts[k]
        inst.relayout = target
        for u in [u for u in inst.units if u.t_start > self.now]:
            self._call(self.s.release, inst.spec.instance_id, u.lease_id, u.start, self.now)
            inst.units.remove(u)
        self._restart_if_drained(k)

    def _restart_if_drained(self, k: int) -> bool:
        """A draining instance with no unit left leaves and comes back in its new layout."""
        inst = self.insts[k]
        if inst.relayout is None or inst.units or not inst.alive:
            return False
        assert self.replan is not None
        speed, seqs = inst.relayout
        self._call(self.s.leave, inst.spec.instance_id, self.now)
        inst.alive, inst.relayout = False, None
        self.alive_count -= 1
        inst.life += 1
        inst.spec = replace(inst.spec, speed=speed, max_num_seqs=seqs, step_s=None)
        inst.step_s = seqs / speed
        self._push(self.now + self.replan.restart_s, JOIN, k)
        return True

    # -- results ------------------------------------------------------------------------------

    def _result(self) -> SimResult:
        end = self.now
        stats = {}
        for inst in self.insts:
            spec = inst.spec
            gone = spec.lost_at if spec.lost_at is not None else end
            up = max(0.0, min(gone, end) - spec.join_at)
            busy = min(inst.busy_s, up)
            stats[spec.instance_id] = InstanceStats(busy, up - busy, inst.rows, inst.n_units)
        return SimResult(
            completed=self.s.done,
            makespan=end if self.s.done else math.inf,
            total_rows=self.s.total_rows,
            total_work=self.work.total,
            lower_bound=fluid_lower_bound(self.specs, self.work.total),
            instances=stats,
            assignments=self.assignments,
            scheduler_calls=self.calls,
            scheduler_s=self.sched_s,
        )


def _given(value: object) -> tuple:
    """An optional trailing argument, left out when unset: a trace of a job without it keeps
    the same calls (the clock last) as before."""
    return (value,) if value else ()


def simulate(
    scheduler: Scheduler,
    instances: list[SimInstance],
    work: RowWork,
    config: SimConfig | None = None,
    replan: SimReplan | None = None,
) -> SimResult:
    return Simulation(scheduler, instances, work, config, replan=replan).run()
