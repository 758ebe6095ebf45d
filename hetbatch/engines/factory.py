"""Build the engine an instance runs: vLLM, or the simulated engine."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from hetbatch.engines.base import Engine
from hetbatch.engines.simulated import SimEngine
from hetbatch.spec import JobSpec, SimEngineSpec

# Where vLLM's engine core runs, measured with bench/overhead.py on the CPU (the tiny model,
# one instance on a 2-core machine): in its own process (vLLM's default) it starts about 13 s
# later, since a spawned interpreter imports vLLM and torch again, and generates about 1.35
# times as fast, since vLLM's front end (tokenizing, detokenizing, handling outputs) then works
# on another core beside the engine's steps instead of between them. A job whose in-process
# generation outlasts the break-even repays the slower start.
OWN_PROCESS_EXTRA_START_S = 13.0
OWN_PROCESS_SPEEDUP = 1.35
BREAK_EVEN_S = OWN_PROCESS_EXTRA_START_S * OWN_PROCESS_SPEEDUP / (OWN_PROCESS_SPEEDUP - 1)
# An instance's rate is not known before it runs: this is about the tiny model's in-process
# rate on one core of the machine measured. A faster engine errs toward its own process, and
# loses at most the 13 s start-up; a slower one errs toward the worker's, and loses up to a
# quarter of a generation shorter than BREAK_EVEN_TOKENS at its rate.
ASSUMED_TOKENS_PER_S = 5_000.0
BREAK_EVEN_TOKENS = BREAK_EVEN_S * ASSUMED_TOKENS_PER_S


def engine_in_own_process(job: JobSpec, rows_per_instance: float, spare_core: bool) -> bool:
    """vLLM's engine core in its own process (True) or in the worker's: the job's own choice,
    else by the output tokens an instance will generate against the break-even. The speed-up
    needs a core for vLLM's front end besides the engine's: a CPU instance on a node whose
    every core runs an engine (`spare_core` False) only adds processes that take turns on the
    engines' cores (measured on two cores with two instances: 0.64 of the in-process rate)."""
    if job.engine.multiprocessing is not None:
        return job.engine.multiprocessing
    tokens = rows_per_instance * job.samples_per_row * int(job.sampling.get("max_tokens", 16))
    return spare_core and job.task == "generate" and tokens >= BREAK_EVEN_TOKENS


PRELOAD_ENV = "HETBATCH_PRELOAD"  # the engine's module a worker imports while it waits


def preload_env(job: JobSpec) -> dict[str, str]:
    """What a launcher gives its workers so that they import vLLM (about 7 s) at once, while
    they wait for the coordinator and the job, rather than after: which engine, and offline
    mode for a local model (Hugging Face reads it when imported)."""
    if job.engine.kind != "vllm":
        return {}
    env = {PRELOAD_ENV: "vllm"}
    if os.path.isdir(job.model.path):
        env["HF_HUB_OFFLINE"] = "1"
    return env


def preload_engine() -> None:
    """Import the engine named by the launcher in a background thread; a later import of it
    waits for this one to finish (Python's import lock) instead of starting over."""
    if os.environ.get(PRELOAD_ENV) == "vllm":
        threading.Thread(target=_import_vllm, daemon=True, name="preload").start()


def _import_vllm() -> None:
    with contextlib.suppress(Exception):  # a broken install fails where the engine is built
        import vllm  # noqa: F401


def prepare_environment(
    job: JobSpec, accelerator: str, own_process: bool | None = None
) -> None:
    """Settings vLLM reads at import time; set before the engine module is imported.
    `own_process`: where the launcher chose to run the engine core (None: the accelerator's
    default, in-process on a CPU)."""
    if job.engine.kind != "vllm":
        return
    multiprocessing = job.engine.multiprocessing
    if multiprocessing is None:
        multiprocessing = own_process if own_process is not None else accelerator.lower() != "cpu"
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

