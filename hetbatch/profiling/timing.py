"""Timed runs of the real engine on this machine, one process per instance of a node.

Run as `python -m hetbatch.profiling.timing JOB POOL PLAN.json OUT.json`, with the
environment of the pool's first instance (its devices) already set: vLLM reads it at import.
PLAN.json lists the points as [concurrency, input_len, output_len]; OUT.json receives one
`Measurement` per point, as a list of dicts.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from hetbatch.planner.calibration import Measurement
from hetbatch.planning import model_from_job
from hetbatch.spec import JobSpec, PoolSpec, load_job

WORD = " hello"
WAVES = 4


def engine_args(job: JobSpec, pool: PoolSpec) -> dict[str, Any]:
    """The engine arguments a worker of the pool would use."""
    args = {**job.model.engine_args, **pool.engine_args}
    if (pool.tensor_parallel_size or 1) > 1:
        args["tensor_parallel_size"] = pool.tensor_parallel_size
    return args


def benchmark_pool(
    job: JobSpec, pool: PoolSpec, points: Sequence[tuple[int, int, int]]
) -> list[Measurement]:
    """One warm-up, then each (concurrency, input_len, output_len) point timed once."""
    from hetbatch.engines.factory import build_engine, prepare_environment

    prepare_environment(job, pool.accelerator)
    instance = {"id": f"profile-{pool.name}", "pool": pool.name,
                "accelerator": pool.accelerator, "engine_args": engine_args(job, pool)}
    engine = build_engine(job, instance)
    try:
        cap = engine.max_concurrency
        batched = _max_batched_tokens(engine)
        _timed(engine, job, 2, 8, 4)
        return [_measure(engine, job, pool, min(b, cap), i, o, batched) for b, i, o in points]
    finally:
        engine.close()


def _max_batched_tokens(engine: Any) -> int:
    inner = getattr(engine, "_engine", None)
    try:
        return int(inner.vllm_config.scheduler_config.max_num_batched_tokens)  # type: ignore[union-attr]
    except AttributeError:
        return 8192


def _measure(
    engine: Any, job: JobSpec, pool: PoolSpec, batch: int, input_len: int, output_len: int,
    batched: int,
) -> Measurement:
    # At the engine's own limit, several waves: requests then enter as others finish, the
    # continuous batching of a real run (new prefills mixed into decode steps), not one
    # lockstep wave. Below the limit the engine would run the waves at once, so one wave.
    n = batch * (WAVES if batch >= engine.max_concurrency else 1)
    elapsed, prompt_tokens, out_tokens = _timed(engine, job, n, input_len, output_len)
    return Measurement(
        accelerator=pool.accelerator, model=job.model.path,
        quantization=model_from_job(job).quantization,
        tensor_parallel_size=pool.tensor_parallel_size or 1, concurrency=batch,
        input_len=prompt_tokens / n, output_len=out_tokens / n,
        max_num_batched_tokens=batched, elapsed_s=elapsed, num_requests=n,
    )


def _timed(
    engine: Any, job: JobSpec, batch: int, input_len: int, output_len: int
) -> tuple[float, int, int]:
    """Wall time of `batch` requests submitted together, each to exactly `output_len` tokens."""
    from hetbatch.engines.base import EngineRequest

    prompt = _prompt(engine, input_len)
    sampling = {**job.sampling, "max_tokens": output_len, "min_tokens": output_len,
                "ignore_eos": True}
    start = time.perf_counter()
    for k in range(batch):
        # A distinct opening per request: identical prompts would share their prefill through
        # vLLM's prefix cache, which a real dataset does not.
        unique = f"{k}{prompt[len(str(k)):]}"
        engine.add(EngineRequest(f"p{time.monotonic_ns()}-{k}", unique,
                                 {**sampling, "seed": job.seed + k}))
    done = []
    while engine.has_unfinished():
        done.extend(engine.step())
    elapsed = time.perf_counter() - start
    return (elapsed, sum(c.prompt_tokens for c in done),
            sum(c.completion_tokens for c in done))


def _prompt(engine: Any, tokens: int) -> str:
    """Text of about `tokens` tokens (BOS included) under the engine's tokenizer."""
    tok = getattr(engine, "_tokenizer", None)
    per_word = len(tok.encode(WORD * 64, add_special_tokens=False)) / 64 if tok else 1.0
    words = max(1, int((tokens - 1) / max(per_word, 1e-3)))
    text = WORD * words
    while tok is not None and words > 1 and len(tok.encode(text)) > tokens:
        words -= 1
        text = WORD * words
    return text


def main(argv: Sequence[str]) -> None:
    job_path, pool_name, plan_path, out_path = argv
    job = load_job(job_path)
    pool = next(p for p in job.cluster.pools if p.name == pool_name)
    with open(plan_path) as fh:
        points = [tuple(int(v) for v in p) for p in json.load(fh)]
    found = benchmark_pool(job, pool, points)  # type: ignore[arg-type]
    with open(out_path, "w") as fh:
        json.dump([asdict(m) for m in found], fh)


if __name__ == "__main__":
    main(sys.argv[1:])
