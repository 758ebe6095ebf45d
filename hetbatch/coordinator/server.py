"""The live coordinator: the pure scheduler driven by the real clock and real workers over TCP.

Built for many thousands of workers on one process:

- One asyncio event loop (a thread) serves every connection; a request is a few microseconds
  of decoding, checking (`messages`) and one scheduler call. Heartbeats are answered inline.
- One lock serialises every scheduler call, so the scheduler sees one event at a time exactly as
  it does in the simulator. Nothing slow ever runs under it.
- Commits go to one committer thread, which takes them in batches: it checks each staged shard
  exists, takes the scheduler's verdicts under the lock (one event at a time), then, outside
  the lock, publishes the accepted shards, appends their ledger lines and discards the rest;
  only then are the workers answered. A unit is published before its ledger line, and
  `_SUCCESS` is written last, by that same thread, once every accepted commit is durable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import queue
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hetbatch.coordinator import messages as m
from hetbatch.coordinator.ledger import CommitRecord, OutputStore, PublishFailed
from hetbatch.coordinator.protocol import MAX_MESSAGE_BYTES, encode_message
from hetbatch.cost import cost_summary
from hetbatch.error_budget import ErrorBudget
from hetbatch.io.paths import OutputPaths
from hetbatch.scheduler.core import CommitStatus, Lease, Scheduler
from hetbatch.scheduler.pacing import PACING
from hetbatch.scheduler.ranges import RangeSet
from hetbatch.scheduler.routing import UNLIMITED

if TYPE_CHECKING:
    from hetbatch.planner.replan import InstanceFigures, Replan, Replanner

log = logging.getLogger("hetbatch.coordinator")

MIN_WRITE_FAILURES = 3  # shard writes failing in a row (and on every instance) stop the job
STALL_S = 0.25  # a tick this late means the coordinator, not the workers, was slow
LISTEN_BACKLOG = 4096  # thousands of workers may connect at the same moment
MAX_COMMIT_BATCH = 512
# What a re-plan changes in a running pool: what each engine runs with, not its devices.
_RELAYOUT_ARGS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
                  "kv_cache_dtype")
MAX_UNSENT_BYTES = 16 << 20  # a peer that stops reading its replies is dropped
# How long rows too long for every joined engine wait for an instance still starting (whose
# engine may hold them) before they are written as row errors.
AWAIT_JOIN_S = 1800.0
_HEADER = struct.Struct(">I")


@dataclass
class InstanceMetrics:
    pool: str
    rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    units: int = 0
    busy_s: float = 0.0
    joined_at: float | None = None
    first_lease_at: float | None = None
    last_commit_at: float | None = None
    connected: bool = False
    engine: tuple[int, int, float] | None = None  # running, waiting, KV-cache use, as reported
    running_sum: float = 0.0  # requests running in its engine, summed over heartbeats
    running_n: int = 0
    peak_running: int = 0  # the most requests its engine has reported running at once

    def to_dict(self, t0: float = 0.0) -> dict[str, Any]:
        span = (self.last_commit_at or 0) - (self.first_lease_at or 0)
        rate = self.completion_tokens / span if span > 0 else 0.0
        return {
            "pool": self.pool,
            "rows": self.rows,
            "units": self.units,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "errors": self.errors,
            "busy_s": round(self.busy_s, 3),
            "active_s": round(max(span, 0.0), 3),
            "output_tokens_per_s": round(rate, 2),
            "connected": self.connected,
            "engine": None if self.engine is None else dict(
                zip(("running", "waiting", "kv_cache_usage"), self.engine, strict=True)
            ),
            "peak_running": self.peak_running,
            "first_lease_s": _since(self.first_lease_at, t0),
            "last_commit_s": _since(self.last_commit_at, t0),
        }


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


@dataclass
class Progress:
    """A snapshot for progress bars and `hetbatch status`."""

    total_rows: int
    rows_done: int
    completion_tokens: int
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: bool = False



class Coordinator:
    """Serves one job's scheduler to its workers."""

    def __init__(
        self,
        scheduler: Scheduler,
        store: OutputStore,
        job: dict[str, Any],
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_done: Callable[[], None] | None = None,
        error_budget: ErrorBudget | None = None,
        replanner: Replanner | None = None,
        replan_check_s: float = 5.0,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.job = job
        self.token = token
        self.clock = clock
        self.on_done = on_done
        self.lock = threading.RLock()
        self.metrics: dict[str, InstanceMetrics] = {}
        self.finished = threading.Event()
        # Set when too many rows fail: the job stops (finished) without _SUCCESS.
        self.budget = error_budget or ErrorBudget()
        self.failure: str | None = None
        self.id_problems: Counter[str] = Counter()  # null and duplicate ids the workers saw
        self._write_failures = 0  # shard writes failed since the last accepted commit
        self.started_at = clock()
        self.started_wall = time.time()
        # For the ledger's per-unit record: when each lease was granted, and which rows were
        # taken by a steal or came back from a lapsed lease (flagged on their next lease).
        self._leased_wall: dict[int, tuple[float, bool, bool]] = {}
        self._released_rows: dict[str, RangeSet] = {}  # by the instance that gave them up
        self._returned_rows = RangeSet()
        self.events: Counter[str] = Counter()  # lease expiries, steals (for live metrics)
        self._tick_due = 0.0
        self._stalls: collections.deque[tuple[float, float]] = collections.deque()
        self._rows_done_at_start = scheduler.committed.total
        self._sock = _listen(host, port)
        self._job_frame: bytes | None = None
        self.replanner = replanner
        self.replan_check_s = replan_check_s
        self.replans: list[dict[str, Any]] = []
        self._restarting: set[str] = set()  # instances told to drain and restart
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._commits: queue.SimpleQueue[tuple[m.Commit, _Connection] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._handlers: dict[type[m.Request], Callable[[Any, _Connection], dict[str, Any]]] = {
            m.StatusRequest: self._op_status,
            m.Hello: self._op_hello,
            m.LeaseRequest: self._op_lease,
            m.Heartbeat: self._op_heartbeat,
            m.Release: self._op_release,
            m.HandBack: self._op_hand_back,
            m.Bye: self._op_bye,
        }
        # Instances of the layout that have not joined yet, with the context they will bring.
        self._awaited = _expected_contexts(job)
        self._largest_joined = 0  # the largest context an instance joined with
        self._await_until = self.started_at + AWAIT_JOIN_S
        self._set_awaited()
        if scheduler.done:
            self._finish()

    def _set_awaited(self) -> None:
        self.scheduler.awaited_context = max(self._awaited.values(), default=0)

    def instance_failed(self, instance: str) -> None:
        """The launcher gave up on an instance: no row waits for it to join."""
        with self.lock:
            if self._awaited.pop(instance, None) is not None:
                self._set_awaited()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        ready = threading.Event()
        loops = [(lambda: self._serve(ready), "coord-loop"), (self._commit_forever, "coord-commit")]
        if self.replanner is not None:
            loops.append((self._replan_forever, "coord-replan"))
        for target, name in loops:
            t = threading.Thread(target=target, daemon=True, name=name)
            t.start()
            self._threads.append(t)
        ready.wait()

    def stop(self) -> None:
        """Close every connection, finish the commits already taken, and return."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._shut_down)
        self._commits.put(None)
        for t in self._threads:
            t.join(timeout=30)
        self._sock.close()
        self.finished.set()

    # -- the event loop -------------------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            server = loop.run_until_complete(
                loop.create_server(
                    lambda: _Connection(self), sock=self._sock, backlog=LISTEN_BACKLOG
                )
            )
            self._schedule_tick()
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
        finally:
            ready.set()
            loop.close()

    def _shut_down(self) -> None:
        for conn in list(self._connections):
            conn.transport.abort()
        assert self._loop is not None
        self._loop.stop()

    def _tick(self) -> None:
        """Give lapsed leases back, not counting time the coordinator itself was stalled."""
        assert self._loop is not None
        late = self._loop.time() - self._tick_due
        now = self.clock()
        if late > STALL_S:  # starved of CPU or busy: heartbeats may be waiting unread
            self._stalls.append((now, late))
        horizon = now - self.scheduler.config.lease_timeout_s
        while self._stalls and self._stalls[0][0] < horizon:
            self._stalls.popleft()
        stalled = sum(lag for _, lag in self._stalls)
        with self.lock:
            if self._awaited and now > self._await_until:
                log.warning("instances never joined: %s", ", ".join(sorted(self._awaited)))
                self._awaited.clear()
                self._set_awaited()
            lapsed = self.scheduler.expire(now - stalled)
            for lease in lapsed:
                self._returned_rows.add(lease.start, lease.end)
        self.events["lease_expired"] += len(lapsed)
        for lease in lapsed:
            log.warning(
                "lease %s of %s lapsed: rows [%s, %s) re-queued",
                lease.lease_id,
                lease.instance,
                lease.start,
                lease.end,
            )
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        assert self._loop is not None
        self._tick_due = self._loop.time() + PACING.expire_tick_s
        self._loop.call_at(self._tick_due, self._tick)

    # -- requests -------------------------------------------------------------------------------

    def on_frame(self, conn: _Connection, body: bytes) -> None:
        """Answer one framed request; anything malformed gets an error reply, nothing more."""
        try:
            data = json.loads(body.decode())
        except ValueError as exc:  # UnicodeDecodeError included
            conn.reply(m.error_reply(f"invalid JSON: {str(exc)[:80]}"))
            return
        token = data.get("token") if type(data) is dict else None
        if type(token) is not str or not hmac.compare_digest(
            token.encode(), self.token.encode()
        ):
            conn.reply(m.error_reply("unauthorized: missing or wrong job token"), close=True)
            return
        try:
            request = m.parse_request(data)
        except m.MessageError as exc:
            conn.reply(m.error_reply(str(exc)))
            return
        refusal = self._refusal(request, conn)
        if refusal is not None:
            conn.reply(m.error_reply(refusal))
        elif isinstance(request, m.Commit):
            conn.hold()
            self._commits.put((request, conn))
        elif isinstance(request, m.JobRequest):
            conn.send_frame(self._job_reply_frame())
        else:
            conn.reply(self._decide(request, conn))

    def _refusal(self, request: m.Request, conn: _Connection) -> str | None:
        """Why this connection may not make this request: it speaks for one instance only,
        the one that said hello on it."""
        instance = getattr(request, "instance", None)
        if instance is None or instance == conn.instance:
            return None
        if isinstance(request, m.Hello) and conn.instance is None:
            return None
        if conn.instance is None:
            return f"{request.OP}: instance {instance[:40]!r} has not said hello on this connection"
        return f"{request.OP}: this connection speaks for {conn.instance[:40]!r}"

    def _decide(self, request: m.Request, conn: _Connection) -> dict[str, Any]:
        try:
            with self.lock:
                return self._handlers[type(request)](request, conn)
        except Exception:
            log.exception("coordinator failed on a %s request", request.OP)
            return m.error_reply(f"{request.OP}: internal error in the coordinator")

    def _job_reply_frame(self) -> bytes:
        if self._job_frame is None:  # thousands of workers ask for the same, maybe large, job
            self._job_frame = encode_message({"job": self.job})
        return self._job_frame

    def _op_hello(self, msg: m.Hello, conn: _Connection) -> dict[str, Any]:
        now = self.clock()
        self.scheduler.join(msg.instance, msg.weight, now, msg.concurrency, msg.context)
        self._largest_joined = max(self._largest_joined, msg.context or UNLIMITED)
        if self._awaited.pop(msg.instance, None) is not None:
            self._set_awaited()
        conn.instance = msg.instance
        metrics = self.metrics.setdefault(msg.instance, InstanceMetrics(pool=msg.pool))
        metrics.connected = True
        metrics.joined_at = metrics.joined_at or now
        return m.done_reply(self.finished.is_set())

    def _op_lease(self, msg: m.LeaseRequest, conn: _Connection) -> dict[str, Any]:
        if self.failure is not None:
            return m.done_reply()
        now = self.clock()
        result = self.scheduler.request(msg.instance, now)
        if isinstance(result, Lease):
            metrics = self.metrics[msg.instance]
            metrics.first_lease_at = metrics.first_lease_at or now
            self._note_lease(result)
            largest = max(self._largest_joined, self.scheduler.awaited_context)
            return m.lease_reply(
                result.lease_id, result.start, result.end, result.above,
                None if result.below == UNLIMITED else result.below, result.limit, result.final,
                None if largest >= UNLIMITED else largest,
            )
        return m.done_reply() if result.done else m.wait_reply(result.seconds)

    def _op_heartbeat(self, msg: m.Heartbeat, conn: _Connection) -> dict[str, Any]:
        if msg.engine is not None and msg.instance in self.metrics:
            metrics = self.metrics[msg.instance]
            metrics.engine = msg.engine
            if msg.engine[0]:  # an idle engine (start, drain) says nothing of its batch
                metrics.running_sum += msg.engine[0]
                metrics.running_n += 1
                metrics.peak_running = max(metrics.peak_running, msg.engine[0])
        reply = self.scheduler.heartbeat(msg.instance, msg.progress, self.clock())
        return m.heartbeat_reply(
            [(r.lease_id, r.cut) for r in reply.releases], reply.revoked, self.finished.is_set(),
            restart=msg.instance in self._restarting,
        )

    def _op_release(self, msg: m.Release, conn: _Connection) -> dict[str, Any]:
        if msg.error is not None:
            return self._write_failed(msg)
        lease = self.scheduler.leases.get(msg.lease)
        start, end = (lease.start, lease.end) if lease is not None else (0, 0)
        self.scheduler.release(msg.instance, msg.lease, msg.cut, self.clock())
        if lease is not None and lease.instance == msg.instance:
            # rows the holder gave back are the thief's: note them
            kept = lease.end if lease.lease_id in self.scheduler.leases else start
            self._released_rows.setdefault(lease.instance, RangeSet()).add(kept, end)
            self.events["steal"] += 1
        return m.OK_REPLY

    def _write_failed(self, msg: m.Release) -> dict[str, Any]:
        """A worker could not write a unit's shard: its rows go back to be dealt again
        (maybe elsewhere). Once every instance, and at least three in a row, failed with no
        shard written in between, writing is what is broken: the job stops, keeping its
        commits."""
        lease = self.scheduler.leases.get(msg.lease)
        if lease is None or lease.instance != msg.instance:
            return m.OK_REPLY
        self.scheduler.release(msg.instance, msg.lease, lease.start, self.clock())
        self._returned_rows.add(lease.start, lease.end)
        self._write_failures += 1
        self.events["write_failed"] += 1
        log.warning(
            "%s could not write rows [%s, %s): %s; re-queued",
            msg.instance, lease.start, lease.end, msg.error,
        )
        if self._write_failures >= max(MIN_WRITE_FAILURES, len(self.metrics)) and (
            self.failure is None
        ):
            self.failure = (
                f"cannot write the output: {msg.error} "
                f"({self._write_failures} shard writes failed in a row)"
            )
            log.info("stopping the job: %s", self.failure)
            threading.Thread(target=self._fail, daemon=True, name="coord-fail").start()
        return m.OK_REPLY

    def _note_lease(self, lease: Lease) -> None:
        """Remember when a lease was granted and whether its rows were stolen (given up by
        another instance for this one) or re-dealt (back from a lapsed lease or a lost holder)."""
        span = (lease.start, lease.end)
        stolen = any(
            victim != lease.instance and rows.overlaps(*span)
            for victim, rows in self._released_rows.items()
        )
        for victim, rows in list(self._released_rows.items()):
            rows.remove(*span)
            if not rows:
                del self._released_rows[victim]
        redealt = self._returned_rows.overlaps(*span)
        self._returned_rows.remove(*span)
        self._leased_wall[lease.lease_id] = (time.time(), stolen, redealt)

    def _op_hand_back(self, msg: m.HandBack, conn: _Connection) -> dict[str, Any]:
        """Rows of a live lease too long for its instance's context (or above its limit) wait
        for an instance that holds them; a lease no longer live is answered alike (its rows
        are dealt again whole, and its commit will be refused)."""
        lease = self.scheduler.leases.get(msg.lease)
        if lease is None or lease.instance != msg.instance:
            return m.OK_REPLY
        state = self.scheduler.instances[msg.instance]
        top = min(state.context, lease.limit or UNLIMITED)
        if msg.at != top:
            return m.error_reply(
                f"handback: at {msg.at}, but this instance's context and the lease's limit "
                f"give {top}"
            )
        self.scheduler.hand_back(msg.instance, msg.lease, self.clock())
        self.events["handed_back"] += 1
        return m.OK_REPLY

    def _op_bye(self, msg: m.Bye, conn: _Connection) -> dict[str, Any]:
        self._disconnect(msg.instance)
        conn.instance = None
        return m.OK_REPLY

    def _op_status(self, msg: m.StatusRequest, conn: _Connection) -> dict[str, Any]:
        return {"progress": self.progress().__dict__}

    def _disconnect(self, instance: str) -> None:
        self._restarting.discard(instance)  # a worker told to restart has left
        for lease in self.scheduler.leave(instance, self.clock()):
            self._returned_rows.add(lease.start, lease.end)
            self.events["left_holding"] += 1
            if self.failure is None:  # a stopped job's workers leave holding units; expected
                log.warning(
                    "%s left holding rows [%s, %s): re-queued", instance, lease.start, lease.end
                )
        if instance in self.metrics:
            self.metrics[instance].connected = False

    def connection_lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if conn.instance is not None:
            with self.lock:
                self._disconnect(conn.instance)

    # -- commits --------------------------------------------------------------------------------

    def _commit_forever(self) -> None:
        while True:
            first = self._commits.get()
            batch = [first]
            while first is not None and len(batch) < MAX_COMMIT_BATCH:
                try:
                    batch.append(self._commits.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            work = [item for item in batch if item is not None]
            if work:
                try:
                    self._commit_batch(work)
                except Exception:
                    log.exception("coordinator failed to commit a batch")
                    for _, conn in work:
                        self._answer(conn, m.error_reply("commit: internal error"))
            if stopping:
                return

    def _commit_batch(self, batch: list[tuple[m.Commit, _Connection]]) -> None:
        """Verdicts under the lock, one commit at a time; the output folder outside it."""
        present = [
            self.store.is_staged(msg.staging, msg.start, msg.end, msg.band) for msg, _ in batch
        ]
        with self.lock:
            verdicts = [
                self._verdict(msg) if ok else None
                for (msg, _), ok in zip(batch, present, strict=True)
            ]
            notes = [self._unit_note(msg) for msg, _ in batch]
        replies: list[dict[str, Any]] = []
        records: list[CommitRecord] = []
        # Publish every accepted shard before discarding any: a discard never races a publish.
        for (msg, _), verdict, note in zip(batch, verdicts, notes, strict=True):
            if verdict is CommitStatus.ACCEPTED:
                try:
                    self.store.publish(msg.staging, msg.start, msg.end, msg.band)
                except Exception as exc:
                    log.exception("rows [%s, %s) accepted but not published", msg.start, msg.end)
                    self.store.note_failed(msg.start, msg.end, exc)
                    replies.append(m.error_reply("commit: the shard could not be published"))
                    continue
                records.append(_record(msg, *note))
            replies.append(
                m.error_reply(f"commit: no staged shard named {msg.staging!r}")
                if verdict is None
                else m.commit_reply(verdict.value)
            )
        for (msg, _), verdict in zip(batch, verdicts, strict=True):
            if verdict is not None and verdict is not CommitStatus.ACCEPTED:
                with contextlib.suppress(OSError):
                    self.store.discard(msg.staging)
        if records:
            self.store.append_many(records)
        for (_, conn), reply in zip(batch, replies, strict=True):
            self._answer(conn, reply)
        if self.failure is not None:
            self._fail()
        elif self.scheduler.done:
            self._finish()

    def _verdict(self, msg: m.Commit) -> CommitStatus:
        now = self.clock()
        band = self._band(msg)
        if band != msg.band:  # rows other than the lease's: never published
            log.warning(
                "commit of rows [%s, %s) needing context in (%s, %s] refused: the lease holds "
                "%s", msg.start, msg.end, *msg.band, "none" if band is None else band,
            )
            return CommitStatus.STALE
        status = self.scheduler.commit(msg.instance, msg.lease, msg.start, msg.end, now)
        if status is CommitStatus.ACCEPTED:
            rows = msg.end - msg.start if band == (0, None) else msg.stats.rows
            self._write_failures = 0
            self._count(msg.instance, rows, msg.stats, now)
            self._spend_budget(rows, msg.stats, now)
        return status

    def _band(self, msg: m.Commit) -> tuple[int, int | None] | None:
        """Which rows of its range a unit may commit: those needing context in (above, top]
        as its live lease holds them; every row for a lease no longer live (a late commit is
        accepted only whole), None for a live lease of another instance."""
        lease = self.scheduler.leases.get(msg.lease)
        if lease is None:
            return (0, None)
        if lease.instance != msg.instance:
            return None
        top = lease.below if lease.handed_at is None else lease.handed_at
        return lease.above, None if top >= UNLIMITED else top

    def _unit_note(self, msg: m.Commit) -> tuple[float, str, bool, bool]:
        """The ledger record's lease time, pool, and whether the rows were stolen or re-dealt."""
        leased_at, stolen, redealt = self._leased_wall.pop(msg.lease, (0.0, False, False))
        metrics = self.metrics.get(msg.instance)
        return leased_at, metrics.pool if metrics else "", stolen, redealt

    def _spend_budget(self, rows: int, stats: m.CommitStats, now: float) -> None:
        """Tally the ids the unit's worker found not to be a key; spend the error budget, and
        mark the job failed once it is spent (the committer then stops it, no _SUCCESS)."""
        for key, count in (("null_ids", stats.null_ids), ("duplicate_ids", stats.duplicate_ids)):
            if count:
                self.id_problems[key] += count
        exceeded = self.budget.record(
            rows, stats.errors, stats.top_error, stats.top_error_rows, now
        )
        if exceeded is not None and self.failure is None:
            self.failure = exceeded.message()
            log.info("stopping the job: %s", self.failure)

    def _answer(self, conn: _Connection, reply: dict[str, Any]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(conn.release_hold, reply)

    # -- re-planning ----------------------------------------------------------------------------

    def _replan_forever(self) -> None:
        """Every `replan_check_s`: the instances' figures taken under the lock, the pure
        decision made outside it, a re-planned pool's workers told to restart under it."""
        assert self.replanner is not None
        while not self.finished.wait(self.replan_check_s):
            with self.lock:
                figures = self._figures()
            try:
                decisions = self.replanner.check(figures)
            except Exception:
                log.exception("re-planning failed; the pools keep their layout")
                return
            for decision in decisions:
                with self.lock:
                    self._relayout(decision)

    def _figures(self) -> list[InstanceFigures]:
        from hetbatch.planner.replan import InstanceFigures

        return [
            InstanceFigures(
                v.pool, v.units, (v.last_commit_at or 0.0) - (v.first_lease_at or 0.0),
                v.completion_tokens, v.rows, v.prompt_tokens,
                concurrency=v.running_sum / v.running_n if v.running_n else None,
            )
            for v in self.metrics.values() if v.connected
        ]

    def _relayout(self, decision: Replan) -> None:
        """New engine settings for the pool's instances (the job workers fetch on start);
        its workers are told at their next heartbeat to finish their units and restart."""
        changed = {k: v for k, v in decision.engine_args.items() if k in _RELAYOUT_ARGS}
        for name, spec in self.job.get("instances", {}).items():
            if spec.get("pool") != decision.pool:
                continue
            spec["engine_args"] = {**spec["engine_args"], **changed}
            spec["weight"] = decision.expected
            if self.metrics.get(name) is not None and self.metrics[name].connected:
                self._restarting.add(name)
        self._job_frame = None
        self.replans.append({**decision.to_dict(), "at_s": round(self.clock() - self.started_at,
                                                                   3)})
        log.warning("re-plan: %s", decision.describe())

    # -- bookkeeping ----------------------------------------------------------------------------

    def _count(self, instance: str, rows: int, stats: m.CommitStats, now: float) -> None:
        metrics = self.metrics[instance]
        metrics.rows += rows
        metrics.units += 1
        metrics.prompt_tokens += stats.prompt_tokens
        metrics.completion_tokens += stats.completion_tokens
        metrics.errors += stats.errors
        metrics.busy_s += stats.busy_s
        metrics.last_commit_at = now

    def _fail(self) -> None:
        """The error budget is spent: keep what is committed, write why, and stop."""
        if self.finished.is_set():
            return
        try:
            self.store.write_json(
                OutputPaths.METRICS, {**self.metrics_dict(), "failure": self.failure}
            )
        except OSError as exc:  # the output may be what failed: stop all the same
            log.warning("metrics not written: %s", exc)
        self.finished.set()
        if self.on_done:
            self.on_done()

    def _finish(self) -> None:
        if self.finished.is_set():
            return
        self.store.write_json(OutputPaths.METRICS, self.metrics_dict())
        try:
            self.store.mark_success()
        except PublishFailed as exc:  # committed units that never became visible: no _SUCCESS
            self.failure = str(exc)
            self._fail()
            return
        self.finished.set()
        if self.on_done:
            self.on_done()

    def metrics_dict(self) -> dict[str, Any]:
        with self.lock:
            wall_s = self.clock() - self.started_at
            instances = {k: v.to_dict(self.started_at) for k, v in sorted(self.metrics.items())}
            metrics = {
                "wall_s": round(wall_s, 3),
                "started_at": round(self.started_wall, 3),
                "rows_total": self.scheduler.total_rows,
                "rows_this_run": self.scheduler.committed.total - self._rows_done_at_start,
                **dict(self.id_problems),
                "instances": instances,
            }
            if self.replans:
                metrics["replans"] = list(self.replans)
        pools = self.job.get("spec", {}).get("cluster", {}).get("pools", [])
        cost = cost_summary(pools, instances, wall_s)
        if cost is not None:
            metrics["cost"] = cost
        return metrics

    def progress(self) -> Progress:
        with self.lock:
            return Progress(
                total_rows=self.scheduler.total_rows,
                rows_done=self.scheduler.committed.total,
                completion_tokens=sum(v.completion_tokens for v in self.metrics.values()),
                instances={k: v.to_dict(self.started_at) for k, v in sorted(self.metrics.items())},
                done=self.finished.is_set(),
            )


def _record(
    msg: m.Commit, leased_at: float, pool: str, stolen: bool, redealt: bool
) -> CommitRecord:
    return CommitRecord(
        msg.start,
        msg.end,
        msg.instance,
        prompt_tokens=msg.stats.prompt_tokens,
        completion_tokens=msg.stats.completion_tokens,
        errors=msg.stats.errors,
        at=time.time(),
        leased_at=leased_at,
        pool=pool,
        stolen=stolen,
        redealt=redealt,
        above=msg.above,
        top=msg.top,
        rows=None if msg.band == (0, None) else msg.stats.rows,
    )


def _expected_contexts(job: dict[str, Any]) -> dict[str, int]:
    """The context each instance of the job's layout will join with: its max_model_len, as
    large as any when not set (vLLM then takes the model's)."""
    sim = job.get("spec", {}).get("engine", {}).get("kind") == "sim"
    return {
        name: int(spec.get("engine_args", {}).get("max_model_len") or (4096 if sim else UNLIMITED))
        for name, spec in job.get("instances", {}).items()
    }


def _listen(host: str, port: int) -> socket.socket:
    """Bind now, so that the address is known before the loop starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


class _Connection(asyncio.Protocol):
    """One peer: frames in, one reply per frame, in order. While its commit is with the
    committer the connection reads nothing more, so replies never overtake each other."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.instance: str | None = None
        self.transport: asyncio.Transport
        self._buffer = bytearray()
        self._held = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.coordinator._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._take_frames()

    def _take_frames(self) -> None:
        while not self._held and not self.transport.is_closing():
            if len(self._buffer) < _HEADER.size:
                return
            (length,) = _HEADER.unpack_from(self._buffer)
            if length > MAX_MESSAGE_BYTES:
                self.reply(
                    m.error_reply(f"message of {length} bytes exceeds {MAX_MESSAGE_BYTES}"),
                    close=True,
                )
                return
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            body = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            self.coordinator.on_frame(self, body)

    def reply(self, message: dict[str, Any], close: bool = False) -> None:
        self.send_frame(encode_message(message))
        if close:
            self.transport.close()

    def send_frame(self, frame: bytes) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(frame)
        if self.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self.transport.abort()

    def hold(self) -> None:
        self._held = True
        self.transport.pause_reading()

    def release_hold(self, reply: dict[str, Any]) -> None:
        self._held = False
        if self.transport.is_closing():
            return
        self.reply(reply)
        self.transport.resume_reading()
        self._take_frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self.coordinator.connection_lost(self)
