"""The throughput model against published measurements (tests/planner/published.csv)."""

from __future__ import annotations

import csv
import dataclasses
import statistics
from pathlib import Path

from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, predict
from hetbatch.planner.profile import load_model_profile

CSV = Path(__file__).with_name("published.csv")
# Engine caps where the source states none: vLLM's and trtllm-bench's large default batches.
DEFAULT_MAX_SEQS = 1024


def _rows() -> list[dict[str, str]]:
    with CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def _predict(row: dict[str, str]) -> tuple[float, int]:
    prof = load_model_profile(row["model"], row["quantization"])
    if row["kv_cache_dtype"] == "fp8":
        prof = dataclasses.replace(prof, kv_dtype_bytes=1)
    deployment = Deployment.uncalibrated(prof, get_accelerator(row["gpu"]), tp=int(row["tp"]))
    est, batch = predict(
        deployment, float(row["input_len"]), float(row["output_len"]),
        max_num_seqs=int(row["max_num_seqs"] or DEFAULT_MAX_SEQS),
    )
    return est.output_tokens_per_s, batch


def test_published_table_is_sourced_and_varied() -> None:
    rows = _rows()
    assert len(rows) >= 15
    assert len({r["gpu"] for r in rows}) >= 4
    sizes = {round(load_model_profile(r["model"]).params / 1e9, -1) for r in rows}
    assert len(sizes) >= 3
    for r in rows:
        assert r["source"].startswith("http") and r["quote"].strip(), r
        measured = r["output_tokens_per_s"].replace(".", "")
        assert measured.isdigit(), r


def test_model_matches_published_throughput() -> None:
    errors = []
    print()
    print(f"{'model':16}{'gpu':11}{'tp':>3}{'in/out':>11}{'conc':>6}"
          f"{'predicted':>11}{'measured':>10}{'error':>8}  engine")
    for r in _rows():
        predicted, batch = _predict(r)
        measured = float(r["output_tokens_per_s"])
        err = predicted / measured - 1
        errors.append(err)
        print(f"{r['model']:16}{r['gpu']:11}{r['tp']:>3}"
              f"{r['input_len'] + '/' + r['output_len']:>11}{batch:>6}"
              f"{predicted:>11.0f}{measured:>10.0f}{err:>+8.0%}  {r['engine']}")
    median = statistics.median(abs(e) for e in errors)
    worst = max(max(1 + e, 1 / (1 + e)) for e in errors)
    print(f"median |error| {median:.1%}, worst ratio {worst:.2f}x over {len(errors)} rows")
    assert median < 0.25
    assert worst < 2.0
