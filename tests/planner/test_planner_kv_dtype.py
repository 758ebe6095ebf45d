"""KV-cache precision in the search, and quantized checkpoints' 16-bit embeddings."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from hetbatch.cli.plan import plan_command
from hetbatch.errors import UserError
from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, memory_fit, predict

LONG = Workload(input_len_mean=3000, input_len_p95=4000, output_len_mean=1000, rows=10_000)


def test_fp8_kv_doubles_capacity_and_halves_reads() -> None:
    model = load_model_profile("llama-3.1-70b", "fp8")
    acc = get_accelerator("H100")
    auto = Deployment.uncalibrated(model, acc, tp=2)
    fp8 = Deployment.uncalibrated(model.with_kv_cache_dtype("fp8"), acc, tp=2)
    fit_auto, fit_fp8 = memory_fit(auto, 256, 8192, 0.9), memory_fit(fp8, 256, 8192, 0.9)
    assert fit_fp8.kv_tokens == pytest.approx(2 * fit_auto.kv_tokens, rel=0.01)
    rate_auto, batch_auto = predict(auto, 3000, 1000, max_num_seqs=1024)
    rate_fp8, batch_fp8 = predict(fp8, 3000, 1000, max_num_seqs=1024)
    assert batch_fp8 > 1.5 * batch_auto
    assert rate_fp8.output_tokens_per_s > 1.3 * rate_auto.output_tokens_per_s


def test_search_tries_fp8_kv_only_when_asked_and_says_so() -> None:
    model = load_model_profile("llama-3.1-8b")
    plain = plan_cluster(model, [PoolRequest("l4", "L4", 1)], LONG)
    assert plain.pools[0].config.kv_cache_dtype == "auto"
    assert "kv_cache_dtype" not in plain.pools[0].engine_args
    searched = plan_cluster(model, [PoolRequest("l4", "L4", 1, kv_cache_dtypes=("auto", "fp8"))],
                            LONG)
    pool = searched.pools[0]
    assert pool.config.kv_cache_dtype == "fp8"
    assert pool.engine_args["kv_cache_dtype"] == "fp8"
    assert pool.output_tokens_per_s > 1.2 * plain.pools[0].output_tokens_per_s


def test_unknown_kv_dtype_is_refused() -> None:
    with pytest.raises(UserError, match="kv_cache_dtype"):
        PoolRequest("p", "H100", 8, kv_cache_dtypes=("int3",))


def test_quantized_checkpoint_keeps_16_bit_embeddings() -> None:
    bf16 = load_model_profile("llama-3.1-8b")
    fp8 = load_model_profile("llama-3.1-8b", "fp8")
    embeddings = bf16.embedding_params
    assert embeddings == 2 * 128256 * 4096
    assert fp8.weight_bytes == pytest.approx(bf16.weight_bytes / 2 + embeddings)


def test_cli_kv_dtype_and_pinned_max_num_seqs() -> None:
    args = ["--model", "llama-3.1-8b", "--accelerator", "L4", "--devices", "1",
            "--input-len", "3000", "--output-len", "1000", "--kv-cache-dtype", "fp8",
            "--max-num-seqs", "48", "--json"]
    result = CliRunner().invoke(plan_command, args)
    assert result.exit_code == 0, result.output
    pool = json.loads(result.output)["pools"][0]
    assert pool["kv_cache_dtype"] == "fp8" and pool["max_num_seqs"] == 48
    assert pool["engine_args"]["kv_cache_dtype"] == "fp8"
