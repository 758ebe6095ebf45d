"""Progress of a job from what it left in its output: the ledger and the job record."""

from __future__ import annotations

from typing import Any

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.errors import UserError


def job_status(output: str) -> dict[str, Any]:
    store = OutputStore(output)
    if not store.exists():
        raise UserError(f"{output}: no hetbatch job has written here")
    record = store.read_json("job.json")
    ledger = store.read_ledger()
    total = int(record["rows"])
    done = sum(r.end - r.start for r in ledger)
    instances: dict[str, dict[str, int]] = {}
    for r in ledger:
        m = instances.setdefault(r.instance, {"rows": 0, "completion_tokens": 0, "errors": 0})
        m["rows"] += r.end - r.start
        m["completion_tokens"] += r.completion_tokens
        m["errors"] += r.errors
    state = "complete" if store.is_complete() else "incomplete"
    return {
        "state": state,
        "rows_total": total,
        "rows_done": done,
        "percent": 100.0 * done / total if total else 100.0,
        "shards": len(ledger),
        "instances": instances,
    }
