"""Build the engine an instance runs: vLLM, or the simulated engine."""

from __future__ import annotations

import os
from typing import Any

from hetbatch.engines.base import Engine
from hetbatch.engines.simulated import SimEngine
from hetbatch.spec import JobSpec, SimEngineSpec


def prepare_environment(job: JobSpec, accelerator: str) -> None:
    """Settings vLLM reads at import time; set before the engine module is imported."""
    if job.engine.kind != "vllm":
        return
    multiprocessing = job.engine.multiprocessing
    if multiprocessing is None:
        multiprocessing = accelerator.lower() != "cpu"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
    if os.path.isdir(job.model.path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_engine(job: JobSpec, instance: dict[str, Any]) -> Engine:
    if job.engine.kind == "sim":
        pool = next(p for p in job.cluster.pools if p.name == instance["pool"])
        sim: SimEngineSpec = pool.sim or job.engine.sim
        max_len = int(instance["engine_args"].get("max_model_len", 4096))
        return SimEngine(
            sim.tokens_per_s, sim.max_num_seqs, max_len, name=instance["id"],
            hang_file=sim.hang_file,
        )
    from hetbatch.engines.vllm_engine import VllmEngine

    args = dict(instance["engine_args"])
    if instance["accelerator"].lower() == "cpu":
        # vLLM's CPU backend crashes on per-request seeds when a prompt's prefill is chunked
        # ("CPU Generator does not use offset"); every row carries a seed, so prefill whole.
        args.setdefault("enable_chunked_prefill", False)
    return VllmEngine(job.model.path, args, name=instance["id"], task=job.task)

