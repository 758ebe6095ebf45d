"""The live coordinator: the pure scheduler driven by the real clock and real workers over TCP.

One lock serialises every decision, so the scheduler sees one event at a time exactly as it does
in the simulator. Publishing a shard (a rename) and appending its ledger line happen under that
lock too: a unit is accepted, published and recorded before any other commit is considered.
"""

from __future__ import annotations

import hmac
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetbatch.coordinator.ledger import CommitRecord, OutputStore
from hetbatch.coordinator.protocol import ProtocolError, recv_message, send_message
from hetbatch.cost import cost_summary
from hetbatch.scheduler.core import CommitStatus, Lease, Scheduler, Wait

log = logging.getLogger("hetbatch.coordinator")


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
        self.started_at = clock()
        self._rows_done_at_start = scheduler.committed.total
        self._server = _Server((host, port), _Handler)
        self._server.coordinator = self
        self._threads: list[threading.Thread] = []
        if scheduler.done:
            self._finish()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> None:
        for target in (self._server.serve_forever, self._tick_forever):
            t = threading.Thread(target=target, daemon=True, name=f"coord-{target.__name__}")
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.finished.set()

    def _tick_forever(self) -> None:
        while not self._server.stopping.wait(0.5):
            with self.lock:
                for lease in self.scheduler.expire(self.clock()):
                    log.warning(
                        "lease %s of %s lapsed: rows [%s, %s) re-queued",
                        lease.lease_id,
                        lease.instance,
                        lease.start,
                        lease.end,
                    )

    # -- requests -----------------------------------------------------------------------------

    def handle(self, message: dict[str, Any], conn_state: dict[str, Any]) -> dict[str, Any]:
        if not hmac.compare_digest(str(message.get("token", "")), self.token):
            return {"error": "unauthorized: missing or wrong job token"}
        op = message.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            return {"error": f"unknown operation {op!r}"}
        with self.lock:
            return handler(message, conn_state)

    def _op_job(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        return {"job": self.job}

    def _op_hello(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        instance = str(msg["instance"])
        conn["instance"] = instance
        now = self.clock()
        concurrency = msg.get("concurrency")
        self.scheduler.join(
            instance, float(msg.get("weight", 1.0)), now, int(concurrency) if concurrency else None
        )
        m = self.metrics.setdefault(instance, InstanceMetrics(pool=str(msg.get("pool", ""))))
        m.connected = True
        m.joined_at = m.joined_at or now
        return {"done": self.finished.is_set()}

    def _op_lease(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        instance = str(msg["instance"])
        now = self.clock()
        result = self.scheduler.request(instance, now)
        if isinstance(result, Lease):
            m = self.metrics[instance]
            m.first_lease_at = m.first_lease_at or now
            return {"lease": {"id": result.lease_id, "start": result.start, "end": result.end}}
        return {"done": True} if result is Wait.DONE else {"wait": 0.25}

    def _op_heartbeat(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        progress = {int(k): (int(v[0]), int(v[1])) for k, v in msg.get("progress", {}).items()}
        reply = self.scheduler.heartbeat(str(msg["instance"]), progress, self.clock())
        return {
            "releases": [[r.lease_id, r.cut] for r in reply.releases],
            "revoked": reply.revoked,
            "done": self.finished.is_set(),
        }

    def _op_release(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        self.scheduler.release(
            str(msg["instance"]), int(msg["lease"]), int(msg["cut"]), self.clock()
        )
        return {"ok": True}

    def _op_commit(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        instance, start, end = str(msg["instance"]), int(msg["start"]), int(msg["end"])
        now = self.clock()
        status = self.scheduler.commit(instance, int(msg["lease"]), start, end, now)
        staging = self.store.staging_url(str(msg["staging"]))
        if status is not CommitStatus.ACCEPTED:
            self.store.discard(staging)
            return {"status": status.value}
        stats = msg.get("stats", {})
        self.store.publish(staging, start, end)
        self.store.append(
            CommitRecord(
                start,
                end,
                instance,
                prompt_tokens=int(stats.get("prompt_tokens", 0)),
                completion_tokens=int(stats.get("completion_tokens", 0)),
                errors=int(stats.get("errors", 0)),
                at=time.time(),
            )
        )
        self._count(instance, end - start, stats, now)
        if self.scheduler.done:
            self._finish()
        return {"status": status.value}

    def _op_bye(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        self._disconnect(str(msg["instance"]))
        conn.pop("instance", None)
        return {"ok": True}

    def _op_status(self, msg: dict[str, Any], conn: dict[str, Any]) -> dict[str, Any]:
        p = self.progress()
        return {"progress": p.__dict__}

    def _disconnect(self, instance: str) -> None:
        for lease in self.scheduler.leave(instance, self.clock()):
            log.warning(
                "%s left holding rows [%s, %s): re-queued", instance, lease.start, lease.end
            )
        if instance in self.metrics:
            self.metrics[instance].connected = False

    def connection_lost(self, conn: dict[str, Any]) -> None:
        instance = conn.get("instance")
        if instance is not None:
            with self.lock:
                self._disconnect(instance)

    # -- bookkeeping --------------------------------------------------------------------------

    def _count(self, instance: str, rows: int, stats: dict[str, Any], now: float) -> None:
        m = self.metrics[instance]
        m.rows += rows
        m.units += 1
        m.prompt_tokens += int(stats.get("prompt_tokens", 0))
        m.completion_tokens += int(stats.get("completion_tokens", 0))
        m.errors += int(stats.get("errors", 0))
        m.busy_s += float(stats.get("busy_s", 0.0))
        m.last_commit_at = now

    def _finish(self) -> None:
        if self.finished.is_set():
            return
        self.store.write_json("metrics.json", self.metrics_dict())
        self.store.mark_success()
        self.finished.set()
        if self.on_done:
            self.on_done()

    def metrics_dict(self) -> dict[str, Any]:
        wall_s = self.clock() - self.started_at
        instances = {k: m.to_dict(self.started_at) for k, m in sorted(self.metrics.items())}
        metrics = {
            "wall_s": round(wall_s, 3),
            "rows_total": self.scheduler.total_rows,
            "rows_this_run": self.scheduler.committed.total - self._rows_done_at_start,
            "instances": instances,
        }
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
                completion_tokens=sum(m.completion_tokens for m in self.metrics.values()),
                instances={k: m.to_dict(self.started_at) for k, m in sorted(self.metrics.items())},
                done=self.finished.is_set(),
            )


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    coordinator: Coordinator

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.stopping = threading.Event()
        super().__init__(*args, **kwargs)

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


class _Handler(socketserver.BaseRequestHandler):
    """One worker connection: read a request, answer it, until the worker hangs up."""

    def handle(self) -> None:
        coordinator = self.server.coordinator  # type: ignore[attr-defined]
        conn: dict[str, Any] = {}
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                message = recv_message(self.request)
                reply = coordinator.handle(message, conn)
                send_message(self.request, reply)
                if reply.get("error", "").startswith("unauthorized"):
                    return
        except (ProtocolError, OSError):
            pass
        except Exception:
            log.exception("coordinator failed on a request")
        finally:
            coordinator.connection_lost(conn)
