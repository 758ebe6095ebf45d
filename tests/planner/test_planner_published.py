"""The planner against published measurements (tests/planner/published.csv).

Steady-state rows are compared with the throughput model; rows of a short run (`num_prompts`
given: every request submitted at once, the run timed to its last token) with the job's
makespan as `hetbatch plan` predicts it, through the simulator. Errors are reported per group:
modern vLLM (the engine the planner plans for), older vLLM, TensorRT-LLM.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from pathlib import Path

from hetbatch.planner import PoolRequest, Workload, plan_cluster
from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, predict
from hetbatch.planner.profile import load_model_profile
from hetbatch.planning import JobPlanInputs, forecast_makespan

CSV = Path(__file__).with_name("published.csv")
SHAREGPT_SIGMA = 1.0  # spread of ShareGPT's lengths (lognormal sigma); an assumption
# Regression bounds a little above today's figures, not the targets (median 15% on modern vLLM,
# no row off by more than 2x): the README states both.
BOUNDS = {"modern-vllm": (0.25, 1.6), "older-vllm": (0.50, 1.7), "tensorrt-llm": (0.25, 1.9)}


def _rows() -> list[dict[str, str]]:
    with CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def _profile(row: dict[str, str]):
    prof = load_model_profile(row["model"], row["quantization"])
    if row["kv_cache_dtype"] == "fp8":
        prof = dataclasses.replace(prof, kv_dtype_bytes=1)
    return prof


def _engine_limits(row: dict[str, str]) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) the run had where the source states none.

    vLLM 0.10 and later pick them by usage context and device (EngineArgs.get_batch_defaults):
    devices of 70 GiB or more other than A100 get 16384 tokens offline (LLM, `bench
    throughput`) and 8192 behind the server (`vllm serve`), 1024 sequences; others 8192 and
    2048 tokens, 256 sequences. vLLM of 2024 ran 256 sequences. trtllm-bench sizes its batch
    from the memory: taken as 1024 sequences and 8192 tokens.
    """
    seqs = int(row["max_num_seqs"]) if row["max_num_seqs"] else None
    if row["group"] == "older-vllm":
        return 8192, seqs or 256
    if row["group"] == "tensorrt-llm":
        return 8192, seqs or 1024
    acc = get_accelerator(row["gpu"])
    server = "serve" in row["engine"]
    if acc.memory_gib >= 70 and not acc.name.startswith("A100"):
        return (8192 if server else 16384), seqs or 1024
    return (2048 if server else 8192), seqs or 256


def _predict(row: dict[str, str]) -> tuple[float, int]:
    """Predicted output tokens/s of the row's run, and the concurrency behind it."""
    if row["num_prompts"]:
        return _predict_short_run(row)
    deployment = Deployment.uncalibrated(_profile(row), get_accelerator(row["gpu"]),
                                         tp=int(row["tp"]))
    tokens, seqs = _engine_limits(row)
    est, batch = predict(
        deployment, float(row["input_len"]), float(row["output_len"]),
        max_num_seqs=seqs, max_num_batched_tokens=tokens,
    )
    return est.output_tokens_per_s, batch


def _predict_short_run(row: dict[str, str]) -> tuple[float, int]:
    """Output tokens over the simulated makespan of `num_prompts` requests on one instance."""
    model = _profile(row)
    tp, rows = int(row["tp"]), int(row["num_prompts"])
    inp, out = float(row["input_len"]), float(row["output_len"])
    sharegpt = "ShareGPT" in row["note"]
    sigma = SHAREGPT_SIGMA if sharegpt else 0.0
    p95 = inp * 3 if sharegpt else inp
    workload = Workload(inp, p95, out, rows=rows,
                        input_len_max=int(p95 * 2) if sharegpt else math.ceil(inp),
                        output_len_max=int(out * 8) if sharegpt else math.ceil(out))
    tokens, seqs = _engine_limits(row)
    pool = PoolRequest("p", row["gpu"], tp, tensor_parallel_size=tp, max_num_seqs=seqs,
                       max_num_batched_tokens=tokens, gpu_memory_utilization=0.9)
    inputs = JobPlanInputs(model, [pool], workload)
    plan = plan_cluster(model, [pool], workload, top_k=0)
    span = forecast_makespan(inputs, plan, output_sigma=sigma, draws=3)
    assert span is not None
    return rows * out / span.makespan_s, plan.pools[0].concurrency


def test_published_table_is_sourced_and_varied() -> None:
    rows = _rows()
    assert len(rows) >= 30
    assert len({r["gpu"] for r in rows}) >= 4
    sizes = {round(load_model_profile(r["model"]).params / 1e9, -1) for r in rows}
    assert len(sizes) >= 4
    assert {r["group"] for r in rows} == {"modern-vllm", "older-vllm", "tensorrt-llm"}
    for r in rows:
        assert r["source"].startswith("http") and r["quote"].strip(), r
        assert r["unit"].strip(), r
        measured = r["output_tokens_per_s"].replace(".", "")
        assert measured.isdigit(), r


def test_model_matches_published_throughput() -> None:
    errors: dict[str, list[float]] = {}
    worst: dict[str, tuple[float, str]] = {}
    print()
    print(f"{'model':16}{'gpu':11}{'tp':>3}{'in/out':>12}{'runs':>6}{'conc':>6}"
          f"{'predicted':>11}{'measured':>10}{'error':>8}  group")
    for r in _rows():
        predicted, batch = _predict(r)
        measured = float(r["output_tokens_per_s"])
        err = predicted / measured - 1
        errors.setdefault(r["group"], []).append(err)
        ratio = max(1 + err, 1 / (1 + err))
        label = f"{r['model']} {r['gpu']} TP{r['tp']} {r['input_len']}/{r['output_len']}"
        if ratio > worst.get(r["group"], (0.0, ""))[0]:
            worst[r["group"]] = (ratio, label)
        print(f"{r['model']:16}{r['gpu']:11}{r['tp']:>3}"
              f"{r['input_len'] + '/' + r['output_len']:>12}{r['num_prompts'] or '-':>6}"
              f"{batch:>6}{predicted:>11.0f}{measured:>10.0f}{err:>+8.0%}  {r['group']}")
    for group, errs in sorted(errors.items()):
        median = statistics.median(abs(e) for e in errs)
        ratio, label = worst[group]
        print(f"{group:13} median |error| {median:.1%}, worst {ratio:.2f}x ({label}) "
              f"over {len(errs)} rows")
    every = [e for errs in errors.values() for e in errs]
    print(f"{'all':13} median |error| {statistics.median(abs(e) for e in every):.1%} "
          f"over {len(every)} rows")
    for group, (median_bound, ratio_bound) in BOUNDS.items():
        assert statistics.median(abs(e) for e in errors[group]) < median_bound, group
        assert worst[group][0] < ratio_bound, group
