"""The few lines `run` prints when a job ends."""

from __future__ import annotations

from typing import Any

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.cost import cost_lines


def summary_lines(store: OutputStore, metrics: dict[str, Any], wall_s: float) -> list[str]:
    instances = metrics.get("instances", {})
    rows = metrics.get("rows_this_run", 0)
    tokens = sum(m["completion_tokens"] for m in instances.values())
    errors = sum(m["errors"] for m in instances.values())
    shards = len(store.records)  # one shard per unit on record: no listing of the output
    lines = [
        f"done: {rows:,} rows in {wall_s:.1f} s, {tokens / max(wall_s, 1e-9):,.0f} output "
        f"tokens/s; wrote {store.url} ({shards} shards)"
        + (f"; {errors:,} rows have an error value" if errors else "")
    ]
    lines += _id_warnings(metrics)
    if instances:
        lines.append(f"  {'instance':<16} {'pool':<10} {'rows':>9} {'share':>6} {'out tok/s':>10}")
        total = max(sum(m["rows"] for m in instances.values()), 1)
        for name, m in instances.items():
            lines.append(
                f"  {name:<16} {m['pool']:<10} {m['rows']:>9,} {100 * m['rows'] / total:>5.1f}% "
                f"{m['output_tokens_per_s']:>10,.0f}"
            )
    if "cost" in metrics:
        lines += cost_lines(metrics["cost"])
    return lines


def _id_warnings(metrics: dict[str, Any]) -> list[str]:
    """Loud lines when the id column turned out not to be a key."""
    found = [
        f"{metrics[k]:,} {what}"
        for k, what in (("null_ids", "null ids"), ("duplicate_ids", "repeated ids within units"))
        if metrics.get(k)
    ]
    if not found:
        return []
    return [
        f"WARNING: the id column is not a key: {' and '.join(found)}; every row is in the "
        "output, but ids do not identify rows (set input.id_is_key: false if that is expected)"
    ]
