"""A job for re-planning on real vLLM (CPU): two instances of the tiny model planned with a
stale calibration that makes the planner pick max_num_seqs 8, far from the best."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from tests.jobutil import write_job

DATA = Path(__file__).resolve().parents[1] / "data" / "prompts.parquet"

# Coefficients measured somewhere else: every token costs the same whatever the batch, so every
# max_num_seqs looks alike and the planner picks the smallest (8); and far too fast.
STALE_CPU = {
    "compute_eff": 0.3, "bandwidth_eff": 0.5, "comm_eff": 0.3, "allreduce_latency_s": 2.5e-5,
    "step_overhead_s": 1e-6, "token_overhead_s": 1e-4, "reserve_gib": 0.5,
    "internode_gbps": 25.0, "pp_loss_per_stage": 0.08, "measurements": 3,
}


def write_replan_job(
    root: Path, rows: int, model: Path | str, replan: bool = True, **replan_fields: object
) -> Path:
    """root/job.yaml (input root/in.parquet, output root/out) and root/stale.calibration.json."""
    root.mkdir(parents=True, exist_ok=True)
    prompts = pl.read_parquet(DATA).select("id", "prompt")
    reps = -(-rows // prompts.height)
    table = pl.concat([prompts.with_columns(pl.col("id") + f"-{k}") for k in range(reps)])
    table = table.head(rows).with_columns(
        id=pl.format("r{}", pl.int_range(rows).cast(pl.String).str.zfill(6)))
    pq.write_table(table.to_arrow(), root / "in.parquet", row_group_size=200)
    (root / "stale.calibration.json").write_text(
        json.dumps({"version": 1, "accelerators": {"cpu": STALE_CPU}}))
    job = {
        "model": {"path": str(model), "engine_args": {
            "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
            "kv_cache_memory_bytes": 64 << 20, "max_num_batched_tokens": 512,
        }},
        "input": {"path": str(root / "in.parquet"), "prompt_column": "prompt", "id_column": "id"},
        "chat": True,
        "sampling": {"max_tokens": 24, "temperature": 0.8, "top_p": 0.95},
        "seed": 7,
        "output": {"path": str(root / "out")},
        "scheduler": {"max_unit_rows": 64, "heartbeat_s": 0.5},
        "replan": {"enabled": replan, "min_units": 2, "min_active_s": 3.0, "check_s": 1.0,
                   **replan_fields},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
    }
    return write_job(root / "job.yaml", job)


def rate_per_instance(records: list[dict]) -> float:
    """Output tokens/s per instance over each instance's span of these ledger records,
    averaged over instances (0 for none)."""
    rates = []
    for name in {r["instance"] for r in records}:
        mine = [r for r in records if r["instance"] == name]
        span = max(r["at"] for r in mine) - min(r["leased_at"] for r in mine)
        rates.append(sum(r["completion_tokens"] for r in mine) / max(span, 1e-6))
    return sum(rates) / len(rates) if rates else 0.0
