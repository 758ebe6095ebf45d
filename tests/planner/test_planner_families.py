"""Built-in profiles of current families: sizes as published, sliding windows, latent
attention and MoE memory and compute."""

from __future__ import annotations

import pytest

from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, kv_bytes_per_token_per_device, predict

# Total and active parameters as the model cards state them, in billions.
SIZES = {
    "Qwen/Qwen3-8B": (8.2, 8.2),
    "Qwen/Qwen3-32B": (32.8, 32.8),
    "Qwen/Qwen3-30B-A3B": (30.5, 3.3),
    "Qwen/Qwen3-235B-A22B": (235, 22),
    "google/gemma-3-27b-it": (27, 27),
    "deepseek-ai/DeepSeek-V3": (671, 37),
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": (109, 17),
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct": (400, 17),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_match_the_model_cards(name: str) -> None:
    total, active = SIZES[name]
    p = load_model_profile(name)
    assert p.params / 1e9 == pytest.approx(total, rel=0.03)
    assert p.active_params / 1e9 == pytest.approx(active, rel=0.04)


def test_gemma3_sliding_window_shrinks_the_cache_at_long_context() -> None:
    gemma = load_model_profile("gemma-3-27b")
    assert (gemma.window, gemma.window_layers) == (1024, 52)
    d = Deployment.uncalibrated(gemma, get_accelerator("H100"), tp=1)
    full, short, long = (kv_bytes_per_token_per_device(d, c) for c in (None, 1000, 8000))
    assert short == full  # within the window every layer holds every token
    assert long == pytest.approx(full * (10 + 52 * 1024 / 8000) / 62)


def test_deepseek_latent_cache_is_small_and_whole_on_every_rank() -> None:
    ds = load_model_profile("deepseek-ai/DeepSeek-R1")
    assert ds.quantization == "fp8" and ds.kv_latent == 576
    assert ds.kv_bytes_per_token == 61 * 576 * 2
    acc = get_accelerator("H200")
    tp1 = kv_bytes_per_token_per_device(Deployment.uncalibrated(ds, acc, tp=1))
    tp8 = kv_bytes_per_token_per_device(Deployment.uncalibrated(ds, acc, tp=8))
    assert tp1 == tp8
    plan = plan_cluster(ds, [PoolRequest("h200", "H200", 8)],
                        Workload(input_len_mean=1000, input_len_p95=2000, output_len_mean=1000))
    assert plan.pools[0].config.tensor_parallel_size == 8


def test_moe_experts_are_their_own_roofline() -> None:
    """At a small batch an MoE step reads a few experts; at a large one it reads them all, and
    their GEMMs see only top_k / experts of the tokens, so a 30B-A3B model is far slower than a
    dense 3B and faster than a dense 30B."""
    acc = get_accelerator("H100")
    moe = load_model_profile("qwen3-30b-a3b")
    dense_small = load_model_profile("qwen3-4b")
    dense_big = load_model_profile("qwen3-32b")

    def rate(p):
        return predict(Deployment.uncalibrated(p, acc, 1), 1000, 1000,
                       max_num_seqs=256)[0].output_tokens_per_s

    assert rate(dense_big) < rate(moe) < rate(dense_small)


def test_llama4_fp8_name_selects_fp8_weights() -> None:
    p = load_model_profile("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8")
    assert p.quantization == "fp8" and p.window == 8192 and p.window_layers == 36
