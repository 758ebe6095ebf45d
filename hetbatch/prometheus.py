"""Prometheus metrics of a running job, served by its coordinator on an optional port
(`coordinator.metrics_port` in the job file).

Figures are read from the coordinator when Prometheus scrapes (a custom collector), so serving
them costs nothing between scrapes and nothing on the coordinator's hot path; the coordinator
only counts a few events (lease expiries, steals) for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hetbatch.errors import UserError


def serve_metrics(coordinator: Any, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
    """Serve /metrics for `coordinator` on host:port (port 0: any free one); return the address."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise UserError(
            "coordinator.metrics_port needs prometheus_client (pip install 'hetbatch[metrics]')"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoordinatorCollector(coordinator))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UserError(f"coordinator.metrics_port {port}: cannot serve there: {exc}") from None
    bound_host, bound_port = server.server_address[:2]
    return str(bound_host), int(bound_port)


class CoordinatorCollector:
    """Reads the coordinator's metrics objects and scheduler state at scrape time."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.coordinator
        with c.lock:
            sched = c.scheduler
            instances = {k: (m.pool, m.rows, m.prompt_tokens, m.completion_tokens, m.errors,
                             m.units, m.connected, m.to_dict(c.started_at)["output_tokens_per_s"])
                         for k, m in c.metrics.items()}
            engines = {k: (m.pool, m.engine) for k, m in c.metrics.items() if m.engine}
            leases: dict[str, int] = {}
            for lease in sched.leases.values():
                leases[lease.instance] = leases.get(lease.instance, 0) + 1
            total, done = sched.total_rows, sched.committed.total
            pending = sched.pending.total
            leased = sum(lease.unfinished_rows for lease in sched.leases.values())
            events = dict(c.events)
            elapsed = c.clock() - c.started_at
        labels = ["pool", "instance"]
        per_instance = {
            "rows": CounterMetricFamily("hetbatch_rows", "Rows committed", labels=labels),
            "prompt": CounterMetricFamily("hetbatch_prompt_tokens", "Prompt tokens of committed "
                                          "rows", labels=labels),
            "completion": CounterMetricFamily("hetbatch_completion_tokens", "Output tokens of "
                                              "committed rows", labels=labels),
            "errors": CounterMetricFamily("hetbatch_row_errors", "Rows committed with an error "
                                          "value", labels=labels),
            "units": CounterMetricFamily("hetbatch_units", "Units committed", labels=labels),
            "leases": GaugeMetricFamily("hetbatch_leases_held", "Leases an instance holds now",
                                        labels=labels),
            "connected": GaugeMetricFamily("hetbatch_instance_connected", "1 while the "
                                           "instance's worker is connected", labels=labels),
            "rate": GaugeMetricFamily("hetbatch_output_tokens_per_second", "Output tokens/s "
                                      "from first lease to last commit", labels=labels),
        }
        for name, (pool, rows, prompt, completion, errors, units, connected, rate) in sorted(
            instances.items()
        ):
            values = {"rows": rows, "prompt": prompt, "completion": completion, "errors": errors,
                      "units": units, "leases": leases.get(name, 0),
                      "connected": int(connected), "rate": rate}
            for key, family in per_instance.items():
                family.add_metric([pool, name], values[key])
        yield from per_instance.values()
        yield from _engine_families(engines, labels)
        this_run = sum(v[1] for v in instances.values())
        rows_per_s = this_run / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rows_per_s if rows_per_s > 0 else float("nan")
        for name, doc, value in (
            ("hetbatch_rows_total_job", "Rows of the whole job", total),
            ("hetbatch_rows_done", "Rows committed, this run and earlier ones", done),
            ("hetbatch_queue_rows", "Rows waiting to be dealt", pending),
            ("hetbatch_leased_rows", "Rows leased and not yet done", leased),
            ("hetbatch_eta_seconds", "Seconds left at this run's average rate", eta),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, key in (
            ("hetbatch_lease_expiries", "Leases that lapsed and went back to the queue",
             "lease_expired"),
            ("hetbatch_steals", "Units whose unstarted tail was given to another instance",
             "steal"),
            ("hetbatch_left_holding", "Leases re-queued because their instance left",
             "left_holding"),
        ):
            yield CounterMetricFamily(name, doc, value=events.get(key, 0))


def _engine_families(
    engines: dict[str, tuple[str, tuple[int, int, float]]], labels: list[str]
) -> Iterator[Any]:
    """The engines' own figures, as each worker last passed them on with its heartbeat."""
    from prometheus_client.core import GaugeMetricFamily

    for index, (name, doc) in enumerate((
        ("hetbatch_engine_running_requests", "Requests the instance's engine is running"),
        ("hetbatch_engine_waiting_requests", "Requests queued inside the instance's engine"),
        ("hetbatch_engine_kv_cache_usage", "Share of the engine's KV cache in use (0 to 1)"),
    )):
        family = GaugeMetricFamily(name, doc, labels=labels)
        for instance, (pool, load) in sorted(engines.items()):
            family.add_metric([pool, instance], load[index])
        yield family
