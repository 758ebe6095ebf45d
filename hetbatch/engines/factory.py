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

    return VllmEngine(job.model.path, vllm_args(job, instance), name=instance["id"], task=job.task)


def vllm_args(job: JobSpec, instance: dict[str, Any]) -> dict[str, Any]:
    """The instance's engine args as this process runs them (its node rank if it spans nodes;
    LoRA slots when the job has adapters)."""
    from hetbatch.launch.span import node_engine_args

    args = node_engine_args(dict(instance["engine_args"]), dict(os.environ))
    if instance["accelerator"].lower() == "cpu":
        # vLLM's CPU backend crashes on per-request seeds when a prompt's prefill is chunked
        # ("CPU Generator does not use offset"); every row carries a seed, so prefill whole.
        args.setdefault("enable_chunked_prefill", False)
    if job.lora is not None:
        args.setdefault("enable_lora", True)
        args.setdefault("max_lora_rank", job.lora.max_lora_rank)
        args.setdefault("max_loras", job.lora.slots())
        # Every adapter stays loaded.
        args.setdefault("max_cpu_loras", max(len(job.lora.adapters), args["max_loras"]))
    return args

