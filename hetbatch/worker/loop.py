"""The worker: one per engine instance, keeping the engine's batch full across unit boundaries.

The loop holds several leases: units whose last requests are finishing in the engine, the unit
being fed, and the next one, read ahead in a background thread. Requests go into the
engine as slots free up, whichever unit they belong to, so the engine never drains at a unit
boundary. A finished unit is written to staging and
committed by a second background thread while the engine keeps stepping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from hetbatch.coordinator.protocol import (
    Client,
    CoordinatorRestarted,
    CoordinatorUnavailable,
    RejectedByCoordinator,
)
from hetbatch.engines.base import Completion, Engine, EngineRequest, RequestRejected
from hetbatch.engines.simulated import approx_tokens
from hetbatch.error_budget import most_common_error
from hetbatch.input_checks import unit_id_problems
from hetbatch.io.parquet import read_rows
from hetbatch.io.paths import OutputPaths
from hetbatch.io.prefix_order import OrderedReader, PrefixOrder
from hetbatch.prompts import RowPrompt, build_prompts, input_columns, row_sampling
from hetbatch.scheduler.pacing import PACING
from hetbatch.scheduler.routing import UNLIMITED
from hetbatch.spec import JobSpec
from hetbatch.worker.output import completion_values, stage_unit

log = logging.getLogger("hetbatch.worker")

BYE_RETRY_S = 5.0  # how long a stopping worker tries to reach the coordinator
HUNG_EXIT = 75  # the exit code of a worker whose engine hung: restart it
RELAYOUT_EXIT = 76  # the exit code of a worker that drained to restart in a re-planned layout
LIVENESS_ENV = "HETBATCH_LIVENESS_FILE"  # touched every second while the worker loop lives


def _run_on(cpus: set[int]) -> None:
    """Let the calling thread run on `cpus` (Linux sets affinity per thread)."""
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)


@dataclass
class Unit:
    """One leased row range as the worker sees it."""

    lease_id: int
    start: int
    end: int
    loaded: Future | None = None
    table: pa.Table | None = None
    prompts: list[RowPrompt] = field(default_factory=list)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_row: int = 0  # index of the next row to hand to the engine
    started_at: float | None = None
    input_rows: list[int] | None = None  # the rows' input indices, in prefix order
    # Rows dealt by the context they need (prompt tokens plus max_tokens): only the rows
    # needing more than `above` and at most `below` are this unit's; rows above `limit` or
    # the engine's context are handed back; `final`, rows no engine holds (those whose prompt
    # it cannot hold are row errors).
    above: int = 0
    below: int | None = None
    limit: int | None = None
    final: bool = False
    largest: int | None = None  # the largest context of the job's engines (None: unknown)
    band: tuple[int, int | None] = (0, None)  # the rows it keeps: needs in (above, top]

    @property
    def submitted(self) -> int:
        return self.start + self.next_row

    @property
    def rows(self) -> int:
        return self.end - self.start

    def complete(self) -> bool:
        return self.table is not None and len(self.results) >= self.rows


class Worker:
    def __init__(
        self,
        client: Client,
        instance_id: str,
        job: JobSpec,
        dataset: Any,
        schema: pa.Schema,
        engine: Engine,
        heartbeat_s: float = 1.0,
        stop: threading.Event | None = None,
        hang_timeout_s: float = 300.0,
        prefix_order: PrefixOrder | None = None,
        helper_cpus: set[int] | None = None,
    ) -> None:
        """`helper_cpus`: the cores the worker's own threads may run on (None: as they are)."""
        self.client = client
        self.instance_id = instance_id
        self.job = job
        self.dataset = dataset
        self.engine = engine
        self.heartbeat_s = heartbeat_s
        self.schema = schema
        self.columns = input_columns(job)
        self.ordered = (
            None if prefix_order is None
            else OrderedReader(job, dataset, prefix_order, self.columns)
        )
        self.units: list[Unit] = []
        self.in_flight: dict[str, tuple[Unit, int]] = {}
        self.window = PACING.window(engine.max_concurrency)
        # The worker's own threads run on every core the process was given, not only on the
        # engine's: an in-process CPU engine pins the thread that built it (and so any thread
        # it starts) to its cores.
        free = {"initializer": _run_on, "initargs": (helper_cpus,)} if helper_cpus else {}
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="read", **free)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="write", **free)
        # Lease and heartbeat requests wait on the coordinator (and on a commit holding the
        # connection): they go out from their own thread, never from the engine's.
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="coordinator", **free)
        self._lease_call: Future | None = None
        self._heartbeat_call: Future | None = None
        self._writes: list[Future] = []
        self._done = False
        self._next_lease_at = 0.0
        self._next_heartbeat_at = 0.0
        # Set from a signal handler (SIGTERM): leave at the next turn of the loop.
        self.stop = stop or threading.Event()
        self.hang_timeout_s = hang_timeout_s
        self._step_since: float | None = None  # when the engine step under way began
        self.restart = False  # told to finish its units and restart in a re-planned layout
        # Tokens the engine holds (prompt plus output): rows needing more are handed back.
        self.context: int | None = getattr(engine, "max_model_len", None)

    # -- main loop ----------------------------------------------------------------------------

    def run(self) -> bool:
        """Work until the job is done (True), or until asked to stop (False: leases given back)."""
        ended = threading.Event()
        threading.Thread(
            target=self._watch, args=(ended,), daemon=True, name="watchdog"
        ).start()
        try:
            while not (self._done and not self.units and not self.in_flight):
                if self.stop.is_set():
                    self._leave()
                    return False
                self._check_writes()
                self._maybe_lease()
                self._maybe_heartbeat()
                fed = self._feed()
                if self.engine.has_unfinished():
                    self._step_since = time.monotonic()
                    completions = self.engine.step()
                    self._step_since = None
                    self._collect(completions)
                elif not fed:
                    time.sleep(PACING.idle_s)
                self._finish_units()
            for f in self._writes:
                f.result()
            return True
        finally:
            ended.set()
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._calls.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=True)

    def _watch(self, ended: threading.Event) -> None:
        """Off the engine's thread: tell the supervisor this process lives (a stopped or
        frozen one stops touching its liveness file), and end the process when an engine
        step has held requests for `hang_timeout_s`: its leases go back, the supervisor
        starts a fresh worker."""
        liveness = os.environ.get(LIVENESS_ENV)
        while True:
            if liveness:  # first at once: the supervisor watches only a worker that has begun
                with contextlib.suppress(OSError), open(liveness, "a"):
                    os.utime(liveness)
            since = self._step_since
            if since is not None and time.monotonic() - since > self.hang_timeout_s:
                log.error(
                    "engine hung: no step finished in %.0f s with %d request(s) in it; giving "
                    "leases back and exiting to be restarted",
                    time.monotonic() - since, len(self.in_flight),
                )
                self._say_bye()
                os._exit(HUNG_EXIT)  # the engine's thread cannot be stopped; the process can
            if ended.wait(1.0):
                return

    def _say_bye(self) -> None:
        """Give every lease back at once; the coordinator re-deals the rows."""
        self.client.retry_s = min(self.client.retry_s, BYE_RETRY_S)  # Slurm's SIGKILL is near
        try:
            self.client.call("bye", instance=self.instance_id)
        except (CoordinatorUnavailable, CoordinatorRestarted, RejectedByCoordinator) as exc:
            log.warning("could not say bye (%s); the leases lapse instead", exc)

    def _leave(self) -> None:
        """Stop now: drop the requests in the engine, let units already being written finish
        their commit (a shard is staged whole or not at all), then give every other lease back
        with `bye`, so that the coordinator re-deals their rows at once."""
        self.engine.abort(list(self.in_flight))
        self.in_flight.clear()
        self._reader.shutdown(wait=False, cancel_futures=True)
        committed = 0
        for f in self._writes:
            try:
                f.result()
                committed += 1
            except Exception as exc:  # its lease goes back with the others
                log.warning("a unit's write failed while stopping: %s", exc)
        self._writes.clear()
        held = [f"[{u.start}, {u.end})" for u in self.units]
        self.units.clear()
        self._say_bye()
        log.info(
            "stopping: %d unit(s) committed, %d lease(s) given back %s",
            committed, len(held), " ".join(held),
        )

    def _maybe_lease(self) -> None:
        """Ask for a unit when the queue runs low; take the answer on a later turn."""
        call = self._lease_call
        if call is not None:
            if call.done():
                self._lease_call = None
                self._take_lease(call.result())
            return
        now = time.monotonic()
        if self._done or len(self.units) >= PACING.max_units or now < self._next_lease_at:
            return
        if self.units and self._unsubmitted() > self.window:
            return  # enough queued: ask later, so that the deal reflects the latest rates
        self._lease_call = self._calls.submit(self.client.call, "lease", instance=self.instance_id)

    def _take_lease(self, reply: dict[str, Any]) -> None:
        now = time.monotonic()
        if "lease" in reply:
            lease = reply["lease"]
            unit = Unit(
                lease["id"], lease["start"], lease["end"], above=lease.get("above", 0),
                below=lease.get("below"), limit=lease.get("limit"), final=lease.get("final", False),
                largest=lease.get("largest"),
            )
            unit.loaded = self._reader.submit(self._load_unit, unit)
            self.units.append(unit)
        elif reply.get("done"):
            self._done = True
        else:
            self._next_lease_at = now + float(reply.get("wait", PACING.wait_s))

    def _unsubmitted(self) -> int:
        return sum(u.rows - u.next_row for u in self.units)

    def _load_unit(self, unit: Unit) -> tuple[Any, ...]:
        """A unit's rows read and made ready, and which of them it keeps by the context they
        need: the others handed back to the coordinator before any of them runs."""
        table, prompts, input_rows = self._load(unit.start, unit.end)
        return table, prompts, input_rows, self._route(unit, prompts)

    def _route(self, unit: Unit, prompts: list[RowPrompt]) -> dict[int, dict[str, Any] | None]:
        """Results settled before the engine: None for a row not this unit's (outside its
        band, or handed back), a row error for a row of a final unit whose prompt no engine
        holds. A final unit's rows whose prompt fits run here, their output cut at the
        context (finish_reason "length"), as vLLM does with a row its context cannot finish."""
        context = self.context or UNLIMITED  # an engine that does not say holds any row
        if context == UNLIMITED and unit.band == (0, None) and not (unit.above or unit.below):
            return {}
        needs = [row_need(self.job, p) for p in prompts]
        below = unit.below if unit.below is not None else UNLIMITED
        top = min(context, unit.limit or UNLIMITED)
        # An engine as large as any of the job's keeps its rows too long for it: no other
        # holds them (a final unit's are such rows).
        last = unit.final or (top == context and context >= (unit.largest or UNLIMITED))
        if last:
            keep_to = below
        elif unit.above < top < below and any(top < n <= below for n in needs):
            self.client.call("handback", instance=self.instance_id, lease=unit.lease_id, at=top)
            keep_to = top
        else:
            keep_to = below
        unit.band = (unit.above, None if keep_to >= UNLIMITED else keep_to)
        settled: dict[int, dict[str, Any] | None] = {}
        for i, n in enumerate(needs):
            if not unit.above < n <= keep_to:
                settled[i] = None
            elif last and prompt_tokens(prompts[i]) >= context:
                settled[i] = {"error": too_long(prompts[i], max(context, unit.above))}
        return settled

    def _load(self, start: int, end: int) -> tuple[pa.Table, list[RowPrompt], list[int] | None]:
        """Read a unit's rows and make them ready for the engine (off the engine's thread).
        In prefix order the unit's positions map to input rows given back with them."""
        input_rows = None
        if self.ordered is not None:
            table, input_rows = self.ordered.read(start, end)
        else:
            table = read_rows(self.dataset, start, end, self.columns)
        prompts = build_prompts(
            self.job, table, start, self.engine.apply_chat_template, input_rows
        )
        for special in (True, False):
            runnable = [p for p in prompts if p.error is None and p.add_special_tokens == special]
            if runnable:
                ids = self.engine.encode_batch([p.prompt for p in runnable], special)
                for p, token_ids in zip(runnable, ids or (), strict=False):
                    p.token_ids = token_ids
        return table, prompts, input_rows

    def _maybe_heartbeat(self) -> None:
        """Send progress every `heartbeat_s`; act on the answer on a later turn."""
        call = self._heartbeat_call
        if call is not None:
            if call.done():
                self._heartbeat_call = None
                self._take_heartbeat_reply(call.result())
            return
        now = time.monotonic()
        if now < self._next_heartbeat_at:
            return
        self._next_heartbeat_at = now + self.heartbeat_s
        progress = {str(u.lease_id): [u.submitted, len(u.results)] for u in self.units}
        load = self.engine.load()
        engine = None if load is None else [load.running, load.waiting, load.kv_cache_usage]
        self._heartbeat_call = self._calls.submit(
            self.client.call, "heartbeat", instance=self.instance_id, progress=progress,
            engine=engine,
        )

    def _take_heartbeat_reply(self, reply: dict[str, Any]) -> None:
        for lease_id in reply.get("revoked", []):
            self._drop(lease_id)
        for lease_id, cut in reply.get("releases", []):
            self._release(lease_id, cut)
        if reply.get("restart") and not self.restart:
            self._drain()

    def _drain(self) -> None:
        """The pool was re-planned: take no more units, give back those not begun, and let
        the loop end once the rest are committed (the worker then restarts, new settings)."""
        self.restart = True
        self._done = True
        unbegun = [u for u in self.units if u.next_row == 0]
        for unit in unbegun:
            self._release(unit.lease_id, unit.start)
        log.info("re-planned: finishing %d unit(s), %d given back, then restarting",
                 len(self.units), len(unbegun))

    def _release(self, lease_id: int, cut: int) -> None:
        """Give back the unstarted tail of a unit; never rows already in the engine."""
        unit = next((u for u in self.units if u.lease_id == lease_id), None)
        if unit is None:
            return
        cut = min(max(cut, unit.submitted), unit.end)
        if unit.table is None:
            unit.loaded.result()  # need its rows settled before shrinking it
            self._settle(unit)
        unit.end = cut
        for i in [i for i in unit.results if i >= cut - unit.start]:
            del unit.results[i]  # rows settled before the engine (not this unit's) past the cut
        if unit.table is not None:
            unit.table = unit.table.slice(0, cut - unit.start)
            unit.prompts = unit.prompts[: cut - unit.start]
            if unit.input_rows is not None:
                unit.input_rows = unit.input_rows[: cut - unit.start]
        self.client.call("release", instance=self.instance_id, lease=lease_id, cut=cut)
        if cut == unit.start:
            self.units.remove(unit)

    def _drop(self, lease_id: int) -> None:
        """The coordinator took this lease back (it lapsed): stop working on it."""
        unit = next((u for u in self.units if u.lease_id == lease_id), None)
        if unit is None:
            return
        ids = [rid for rid, (u, _) in self.in_flight.items() if u is unit]
        self.engine.abort(ids)
        for rid in ids:
            del self.in_flight[rid]
        self.units.remove(unit)

    # -- feeding the engine -------------------------------------------------------------------

    def _settle(self, unit: Unit) -> bool:
        if unit.table is not None:
            return True
        if unit.loaded is None or not unit.loaded.done():
            return False
        unit.table, unit.prompts, unit.input_rows, settled = unit.loaded.result()
        unit.results.update(settled)
        unit.started_at = time.monotonic()
        return True

    def _feed(self) -> bool:
        """Hand rows to the engine until `window` requests are in flight."""
        fed = False
        for unit in self.units:
            if len(self.in_flight) >= self.window:
                break
            if not self._settle(unit):
                break
            while unit.next_row < unit.rows and len(self.in_flight) < self.window:
                if unit.next_row not in unit.results:  # else settled before the engine
                    self._submit(unit, unit.next_row)
                unit.next_row += 1
                fed = True
        return fed

    def _submit(self, unit: Unit, i: int) -> None:
        row = unit.prompts[i]
        if row.error is not None:
            unit.results[i] = {"error": row.error}
            return
        rid = f"{unit.lease_id}:{i}"
        sampling = row_sampling(self.job, row)
        try:
            self.engine.add(EngineRequest(rid, row.prompt, sampling, row.token_ids, row.adapter))
        except RequestRejected as exc:
            unit.results[i] = {"error": str(exc)}
            return
        self.in_flight[rid] = (unit, i)

    def _collect(self, completions: list[Completion]) -> None:
        for c in completions:
            entry = self.in_flight.pop(c.request_id, None)
            if entry is None:
                continue
            unit, i = entry
            unit.results[i] = completion_values(self.job, c, unit.prompts[i])

    # -- committing ---------------------------------------------------------------------------

    def _finish_units(self) -> None:
        for unit in [u for u in self.units if u.complete()]:
            self.units.remove(unit)
            self._writes.append(self._writer.submit(self._write_and_commit, unit))

    def _check_writes(self) -> None:
        for f in [f for f in self._writes if f.done()]:
            self._writes.remove(f)
            f.result()  # re-raise a failed write here, in the main loop

    def _write_and_commit(self, unit: Unit) -> None:
        kept = [i for i in range(unit.rows) if unit.results[i] is not None]
        results = [unit.results[i] for i in kept]
        prompts = [unit.prompts[i] for i in kept]
        name = f"{self.instance_id}-{unit.lease_id}-{unit.start}-{unit.end}"
        table, input_rows = unit.table, unit.input_rows
        if len(kept) < unit.rows or unit.band != (0, None):  # only some rows of its range
            table = table.take(pa.array(kept, pa.int64()))  # none kept: an empty shard
            input_rows = [unit.start + i if input_rows is None else input_rows[i] for i in kept]
        elif input_rows is not None:
            input_rows = input_rows[: unit.rows]
        try:
            staged = stage_unit(
                self.job, self.schema, table, unit.start, unit.end, results, prompts,
                self.instance_id, name, input_rows, unit.band,
            )
        except Exception as exc:  # disk full, permission lost, an object store's error
            self._write_failed(unit, name, exc)
            return
        errors, top_error, top_error_rows = most_common_error(
            r["error"] for r in results if r.get("error") is not None
        )
        stats = {
            "rows": len(kept),
            "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in results),
            "completion_tokens": sum(r.get("completion_tokens") or 0 for r in results),
            "errors": errors,
            "top_error": top_error,
            "top_error_rows": top_error_rows,
            **self._id_problems(prompts),
            "busy_s": time.monotonic() - (unit.started_at or time.monotonic()),
        }
        reply = self.client.call(
            "commit",
            instance=self.instance_id,
            lease=unit.lease_id,
            start=unit.start,
            end=unit.end,
            staging=staged,
            stats=stats,
            **({} if unit.band == (0, None) else {"above": unit.band[0], "top": unit.band[1]}),
        )
        self._next_lease_at = 0.0  # its queue changed: what it was told to wait for may have too
        if reply.get("status") == "stale":
            log.warning(
                "unit [%s, %s) was taken over by another instance; discarded", unit.start, unit.end
            )

    def _write_failed(self, unit: Unit, name: str, exc: Exception) -> None:
        """Remove what the failed write left in staging and give the unit back, saying why:
        the coordinator deals it again and stops the job if writes keep failing."""
        error = f"{type(exc).__name__}: {exc}"
        log.warning("could not write rows [%s, %s): %s", unit.start, unit.end, error)
        output = OutputPaths(self.job.output.path, self.job.output.storage_options)
        for suffix in (".parquet", ".jsonl"):  # whichever the output format staged
            with contextlib.suppress(Exception):
                output.files.rm(OutputPaths.staging(name + suffix))
        self.client.call(
            "release", instance=self.instance_id, lease=unit.lease_id, cut=unit.start,
            error=error,
        )

    def _id_problems(self, prompts: list[RowPrompt]) -> dict[str, int]:
        """Null and repeated ids among the unit's rows: seen here at no extra read."""
        if not (self.job.input.id_column and self.job.input.id_is_key):
            return {}
        nulls, duplicates = unit_id_problems([p.key for p in prompts])
        return {"null_ids": nulls, "duplicate_ids": duplicates}


def prompt_tokens(prompt: RowPrompt) -> int:
    """A prompt's tokens: its token ids, or the simulated engine's count when the engine
    tokenizes nothing ahead."""
    if prompt.token_ids is not None:
        return len(prompt.token_ids)
    return approx_tokens(prompt.prompt or "")


def row_need(job: JobSpec, prompt: RowPrompt) -> int:
    """Tokens of context a row needs: its prompt's plus the most it may generate (at least 1;
    a row that cannot be run at all, an input error, is written wherever its range goes)."""
    if prompt.error is not None or prompt.prompt is None:
        return 1
    if job.task != "generate":
        return max(prompt_tokens(prompt), 1)
    max_tokens = prompt.sampling.get("max_tokens", job.sampling.get("max_tokens"))
    return prompt_tokens(prompt) + int(max_tokens or 1)


def too_long(prompt: RowPrompt, context: int) -> str:
    """The error of a row whose prompt no engine of the job holds."""
    return (
        f"prompt is {prompt_tokens(prompt)} tokens, longer than the model's context of "
        f"{context} (no engine of this job holds more)"
    )
