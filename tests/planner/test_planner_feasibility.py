"""Memory feasibility, quantization, MoE, errors and the small end of the range."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hetbatch.errors import UserError
from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import DEFAULT_CATALOG, get_accelerator, with_overrides
from hetbatch.planner.model import Deployment, cycle_features, weight_bytes_touched
from hetbatch.planner.search import quantization_problem


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
        ("meta-llama/Meta-Llama-3-70B", 70.55),
        ("Llama-3.3-70B-Instruct", 70.55),
        ("meta-llama/Llama-2-7b-chat-hf", 6.74),
        ("meta-llama/Llama-2-13b-hf", 13.02),
        ("Qwen/Qwen2.5-72B-Instruct", 72.7),
        ("qwen2.5-7b-instruct", 7.62),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7.25),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", 46.7),
    ],
)
def test_builtin_names_resolve_with_published_sizes(name: str, billions: float) -> None:
    prof = load_model_profile(name)
    assert prof.params / 1e9 == pytest.approx(billions, rel=0.02)


def test_local_config_matches_builtin(tmp_path: Path) -> None:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "vocab_size": 152064, "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "attention_bias": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    local = load_model_profile(str(tmp_path))
    builtin = load_model_profile("Qwen/Qwen2.5-7B-Instruct")
    assert local.params == builtin.params
    assert local.kv_bytes_per_token == builtin.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2


def test_quantization_sets_weight_bytes() -> None:
    bf16 = load_model_profile("llama-3.1-70b")
    fp8 = load_model_profile("llama-3.1-70b", "fp8")
    int4 = load_model_profile("llama-3.1-70b", "INT4")
    embeddings = 2 * 128256 * 8192
    assert fp8.weight_bytes == pytest.approx((bf16.weight_bytes - 2 * embeddings) / 2
                                             + 2 * embeddings)
    assert int4.weight_bytes < fp8.weight_bytes * 0.6
    with pytest.raises(UserError, match="unknown quantization"):
        load_model_profile("llama-3.1-70b", "nf3")


def test_unknown_model_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"unknown model 'gpt-17-ultra'.*llama-3.1-8b"):
        load_model_profile("gpt-17-ultra")


def test_unknown_accelerator_lists_known_names(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    with pytest.raises(UserError) as err:
        plan_cluster(model, [PoolRequest("x", "tpu-v9", 8)], chat_workload)
    message = str(err.value)
    assert "\n" not in message
    assert "tpu-v9" in message and "H100 SXM" in message and "MI300X" in message


def test_aliases_and_overrides() -> None:
    assert get_accelerator("h100").name == "H100 SXM"
    assert get_accelerator("A100").name == "A100 80GB"
    assert get_accelerator("a100-40gb").name == "A100 40GB"
    assert get_accelerator("GAUDI2").name == "Gaudi 2"
    assert len(DEFAULT_CATALOG.accelerators) >= 15
    cat = with_overrides({
        "H100": {"memory_bw_gbps": 3000},
        "RTX 4090": {"memory_gib": 24, "memory_bw_gbps": 1008, "bf16_tflops": 165,
                     "interconnect_gbps": 64},
    })
    assert cat.get("h100 sxm").memory_bw_gbps == 3000
    assert cat.get("rtx 4090").memory_gib == 24
    with pytest.raises(UserError, match="unknown field"):
        with_overrides({"H100": {"hbm": 1}})
    with pytest.raises(UserError, match="needs"):
        with_overrides({"NewCard": {"memory_gib": 10}})


def test_70b_on_24gb_cards_needs_tp8(chat_workload: Workload) -> None:
    model = load_model_profile("meta-llama/Llama-3.1-70B-Instruct")
    plan = plan_cluster(model, [PoolRequest("l4", "L4", 8)], chat_workload)
    pool = plan.pools[0]
    assert pool.config.tensor_parallel_size == 8
    assert pool.engine_args["tensor_parallel_size"] == 8
    layouts = {r.config.tensor_parallel_size for r in pool.rejected if "exceed" in r.reason}
    assert {1, 2, 4} <= layouts


def test_70b_on_four_24gb_cards_says_what_would_fit(chat_workload: Workload) -> None:
    model = load_model_profile("meta-llama/Llama-3.1-70B-Instruct")
    with pytest.raises(UserError) as err:
        plan_cluster(model, [PoolRequest("l4", "L4", 4)], chat_workload)
    message = str(err.value)
    assert "fits in no pool" in message
    assert "8 x L4 per node" in message
    assert "--quantization" in message
    assert "larger card" in message


def test_70b_across_nodes_uses_pipeline_parallelism(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-70b")
    plan = plan_cluster(model, [PoolRequest("l4", "L4", 4, nodes=2)], chat_workload)
    cfg = plan.pools[0].config
    assert (cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.instances) == (4, 2, 1)
    assert plan.pools[0].engine_args["pipeline_parallel_size"] == 2


def test_moe_uses_active_params_for_compute_and_total_for_memory() -> None:
    mixtral = load_model_profile("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert mixtral.active_params / 1e9 == pytest.approx(12.9, rel=0.03)
    assert mixtral.weight_bytes == pytest.approx(mixtral.params * 2)
    dense = dataclasses.replace(mixtral, active_params=mixtral.params, num_experts=1,
                                experts_per_tok=1, expert_params=0)
    acc = get_accelerator("H100")
    moe_work = cycle_features(Deployment.uncalibrated(mixtral, acc, tp=2), 256, 8192, 512, 256)
    dense_work = cycle_features(Deployment.uncalibrated(dense, acc, tp=2), 256, 8192, 512, 256)
    assert dense_work.compute_s / moe_work.compute_s > 2.5
    # One token per step reads 2 of 8 experts; a large step reads them all.
    assert weight_bytes_touched(mixtral, 1) < 0.45 * mixtral.weight_bytes
    assert weight_bytes_touched(mixtral, 4096) == pytest.approx(mixtral.weight_bytes, rel=1e-3)


def test_moe_memory_is_total_params(chat_workload: Workload) -> None:
    mixtral = load_model_profile("mixtral-8x7b")
    plan = plan_cluster(mixtral, [PoolRequest("a100", "A100", 2)], chat_workload)
    assert plan.pools[0].config.tensor_parallel_size == 2  # 87 GiB does not fit one 80 GiB card
    assert any(r.config.tensor_parallel_size == 1 and "exceed" in r.reason
               for r in plan.pools[0].rejected)


def test_fp8_on_card_without_fp8_is_rejected_with_reason(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b", "fp8")
    assert "FP8" in (quantization_problem(model, get_accelerator("A100")) or "")
    assert quantization_problem(model, get_accelerator("H100")) is None
    pools = [PoolRequest("a100", "A100", 8), PoolRequest("h100", "H100", 8)]
    plan = plan_cluster(model, pools, chat_workload)
    assert [p.pool for p in plan.pools] == ["h100"]
    assert plan.unused_pools == ("a100",)
    assert any("a100" in n and "FP8" in n for n in plan.notes)
    assert plan.pools[0].engine_args["quantization"] == "fp8"
    with pytest.raises(UserError, match="FP8"):
        plan_cluster(model, [pools[0]], chat_workload)


def test_tiny_model_on_cpu(tiny_model_dir: Path) -> None:
    model = load_model_profile(str(tiny_model_dir))
    assert (model.layers, model.hidden, model.heads, model.kv_heads) == (2, 128, 4, 2)
    assert model.quantization == "fp32"
    workload = Workload(input_len_mean=64, input_len_p95=128, output_len_mean=32, rows=1000)
    plan = plan_cluster(model, [PoolRequest("laptop", "cpu", 1)], workload)
    pool = plan.pools[0]
    assert pool.config.tensor_parallel_size == 1 and pool.instances == 1
    assert pool.output_tokens_per_s > 0 and plan.est_time_s is not None
    assert pool.engine_args["max_model_len"] == 256 + 64
    assert any("VLLM_CPU_KVCACHE_SPACE=" in n for n in plan.notes)


def test_pinned_values_restrict_the_search(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    plan = plan_cluster(model, [PoolRequest("h", "H100", 8, tensor_parallel_size=2)],
                        chat_workload)
    assert plan.pools[0].config.tensor_parallel_size == 2
    assert plan.pools[0].instances == 4
    plan = plan_cluster(model, [PoolRequest("h", "H100", 8, instances_per_node=2)],
                        chat_workload)
    assert plan.pools[0].config.instances_per_node == 2


def test_cards_without_bf16_get_float16(chat_workload: Workload) -> None:
    model = load_model_profile("llama-3.1-8b")
    plan = plan_cluster(model, [PoolRequest("v100", "V100", 8)], chat_workload)
    assert plan.pools[0].engine_args["dtype"] == "float16"


def test_planner_imports_no_engine() -> None:
    import subprocess
    import sys

    code = ("import sys, hetbatch.planner, hetbatch.planning, hetbatch.cli; "
            "print(any(m.split('.')[0] in ('vllm', 'torch') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_planner_is_pure() -> None:
    """planner/ imports no other room of hetbatch and nothing that reads data files, starts
    processes or threads, or talks to a network."""
    import subprocess
    import sys

    code = "import sys, hetbatch.planner; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    modules = out.stdout.split()
    ours = {m for m in modules if m.split(".")[0] == "hetbatch"}
    assert {m for m in ours if not m.startswith("hetbatch.planner")} == {
        "hetbatch", "hetbatch.errors"}
    impure = ("subprocess", "threading", "socket", "pyarrow", "fsspec", "click", "vllm", "torch")
    assert [m for m in impure if m in modules] == []
