"""Progress of a job: from what it left in its output (the ledger and the job record), from its
coordinator while one answers (rates and ETA), and from Slurm for submitted jobs."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.coordinator.messages import StatusRequest
from hetbatch.coordinator.protocol import (
    ProtocolError,
    file_locator,
    recv_message,
    send_message,
)
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths


def job_status(output: str, live: bool = True) -> dict[str, Any]:
    store = OutputStore(output)
    if not store.exists():
        raise UserError(f"{output}: no hetbatch job has written here")
    record = store.read_json(OutputPaths.JOB)
    ledger = store.read_ledger()
    total = int(record["rows"])
    done = sum(r.row_count for r in ledger)
    instances: dict[str, dict[str, int]] = {}
    for r in ledger:
        m = instances.setdefault(r.instance, {"rows": 0, "completion_tokens": 0, "errors": 0})
        m["rows"] += r.row_count
        m["completion_tokens"] += r.completion_tokens
        m["errors"] += r.errors
    state = "complete" if store.is_complete() else "incomplete"
    info: dict[str, Any] = {
        "state": state,
        "rows_total": total,
        "rows_done": done,
        "percent": 100.0 * done / total if total else 100.0,
        "shards": len(ledger),
        "instances": instances,
    }
    if live and state != "complete":
        info["live"] = live_status(store)
    if live and store.paths.files.exists(OutputPaths.SLURM_RECORD):
        info["slurm"] = slurm_status(store)
    return info


def live_status(store: OutputStore, timeout_s: float = 3.0) -> dict[str, Any] | None:
    """Rates and ETA from the running coordinator; None when none answers."""
    try:
        host, port, _ = file_locator(store.url_of(OutputPaths.COORDINATOR))()
        token = store.paths.files.read_text(OutputPaths.TOKEN).strip()
    except Exception:
        return None  # no coordinator address or no token file (a local run): ledger only
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            send_message(sock, StatusRequest().to_wire(token))
            reply = recv_message(sock)
    except (OSError, ProtocolError):
        return None
    progress = reply.get("progress")
    return None if not isinstance(progress, dict) else _rates(progress, host, port)


def _rates(progress: dict[str, Any], host: str, port: int) -> dict[str, Any]:
    pools: dict[str, dict[str, float]] = {}
    rows_per_s = 0.0
    for m in progress["instances"].values():
        p = pools.setdefault(m["pool"], {"instances": 0, "output_tokens_per_s": 0.0})
        p["instances"] += 1
        p["output_tokens_per_s"] += m["output_tokens_per_s"]
        if m["active_s"] > 0:
            rows_per_s += m["rows"] / m["active_s"]
    left = progress["total_rows"] - progress["rows_done"]
    return {
        "coordinator": f"{host}:{port}",
        "rows_done": progress["rows_done"],
        "rows_per_s": round(rows_per_s, 2),
        "eta_s": round(left / rows_per_s, 1) if rows_per_s > 0 else None,
        "pools": pools,
        "instances": progress["instances"],
    }


def slurm_status(store: OutputStore) -> list[dict[str, Any]]:
    """Each submitted job with Slurm's state of it (of each task, for arrays)."""
    from hetbatch.launch.slurm import commands
    from hetbatch.launch.slurm.submit import read_record

    jobs = read_record(store)
    states: list[commands.JobState] = []
    with contextlib.suppress(commands.SlurmUnavailable):
        states = commands.squeue([j["id"] for j in jobs])
    rows = []
    for j in jobs:
        mine = [s for s in states if commands.base_id(s.job_id) == j["id"]]
        role = j["role"] if j["role"] != "pool" else f"pool {j['pool']}"
        if not mine:
            rows.append({"id": j["id"], "role": role, "state": "GONE", "reason": ""})
        for s in mine:
            rows.append({"id": s.job_id, "role": role, "state": s.state, "reason": s.reason})
    return rows
