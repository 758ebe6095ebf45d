"""Shared fixtures: a tiny local model and a few workloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetbatch.planner.types import Workload

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


@pytest.fixture
def chat_workload() -> Workload:
    return Workload(input_len_mean=512, input_len_p95=1024, output_len_mean=256, rows=1_000_000)
