"""Model profiles: the few architecture numbers that decide memory and speed.

A profile is read from a local config.json (Hugging Face layout) or taken from a built-in table of
popular architectures, so that planning a hub model needs no download. Parameter counts are
derived from the shapes, the same way for both, so a built-in entry and its config.json agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hetbatch.errors import UserError

# Bytes per weight for each weight format. int4 carries one fp16 scale per group of 128.
WEIGHT_BYTES: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 2 / 128,
}
QUANTIZATIONS: tuple[str, ...] = tuple(WEIGHT_BYTES)
# Quantized checkpoints (FP8, INT8, AWQ/GPTQ) and vLLM's on-load FP8 keep the embedding table
# and the LM head in 16 bits: they are read and stored as such.
QUANTIZED: frozenset[str] = frozenset({"fp8", "int8", "int4"})
# vLLM's kv_cache_dtype values and the bytes per element they store ("auto": the model's dtype).
KV_CACHE_DTYPES: dict[str, int | None] = {
    "auto": None, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "bfloat16": 2, "float16": 2,
}


@dataclass(frozen=True)
class ModelProfile:
    """Architecture numbers of one model under one weight format."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position: int
    params: int  # all weights, embeddings included
    active_params: int  # weights used per token (MoE: only the routed experts)
    expert_params: int  # weights inside routed experts (0 for dense models)
    num_experts: int
    experts_per_tok: int
    tie_embeddings: bool
    quantization: str  # weight format: bf16, fp16, fp32, fp8, int8, int4
    kv_dtype_bytes: int = 2
    checkpoint_format: str = ""  # the format the checkpoint itself declares

    @property
    def weight_bytes_per_param(self) -> float:
        return WEIGHT_BYTES[self.quantization]

    @property
    def embedding_params(self) -> int:
        """The embedding table and the LM head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tie_embeddings else 2)

    @property
    def embedding_bytes_per_param(self) -> float:
        return 2.0 if self.quantization in QUANTIZED else self.weight_bytes_per_param

    @property
    def weight_bytes(self) -> float:
        """Bytes of all weights: embeddings and head as a quantized checkpoint stores them (16
        bits), the rest (norms counted alike, small) in the weight format."""
        body = (self.params - self.embedding_params) * self.weight_bytes_per_param
        return body + self.embedding_params * self.embedding_bytes_per_param

    def with_kv_cache_dtype(self, kv_cache_dtype: str) -> ModelProfile:
        """The same model with its KV cache stored as vLLM's `kv_cache_dtype` asks."""
        key = kv_cache_dtype.lower()
        if key not in KV_CACHE_DTYPES:
            raise UserError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; known: "
                            f"{', '.join(KV_CACHE_DTYPES)}")
        nbytes = KV_CACHE_DTYPES[key]
        return self if nbytes is None else replace(self, kv_dtype_bytes=nbytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.kv_dtype_bytes

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "quantization": self.quantization, "params": self.params,
            "active_params": self.active_params, "layers": self.layers, "hidden": self.hidden,
            "heads": self.heads, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab": self.vocab, "max_position": self.max_position,
            "num_experts": self.num_experts, "experts_per_tok": self.experts_per_tok,
            "weight_bytes": self.weight_bytes, "kv_bytes_per_token": self.kv_bytes_per_token,
        }


def _llama(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int,
           max_pos: int, **extra: Any) -> dict[str, Any]:
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "torch_dtype": "bfloat16", **extra,
    }


# Shapes from each model's published config.json on its Hugging Face model card.
_BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, 8192),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, 131072),
    "llama-3-70b": _llama(8192, 80, 64, 8, 28672, 128256, 8192),
    "llama-3.1-70b": _llama(8192, 80, 64, 8, 28672, 128256, 131072),
    "llama-3.1-405b": _llama(16384, 126, 128, 8, 53248, 128256, 131072),
    "llama-2-7b": _llama(4096, 32, 32, 32, 11008, 32000, 4096, torch_dtype="float16"),
    "llama-2-13b": _llama(5120, 40, 40, 40, 13824, 32000, 4096, torch_dtype="float16"),
    "llama-2-70b": _llama(8192, 80, 64, 8, 28672, 32000, 4096, torch_dtype="float16"),
    "qwen2.5-7b": _llama(3584, 28, 28, 4, 18944, 152064, 32768, attention_bias=True),
    "qwen2.5-14b": _llama(5120, 48, 40, 8, 13824, 152064, 32768, attention_bias=True),
    "qwen2.5-32b": _llama(5120, 64, 40, 8, 27648, 152064, 32768, attention_bias=True),
    "qwen2.5-72b": _llama(8192, 80, 64, 8, 29568, 152064, 32768, attention_bias=True),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32768, 32768),
    "mixtral-8x7b": _llama(4096, 32, 32, 8, 14336, 32000, 32768,
                           num_local_experts=8, num_experts_per_tok=2),
}

_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llama-?3\.[123]-(8b|70b|405b)", "llama-3.1-{0}"),
    (r"llama-?3-(8b|70b|405b)", "llama-3-{0}"),
    (r"llama-?2-(7b|13b|70b)", "llama-2-{0}"),
    (r"qwen2\.5-(7b|14b|32b|72b)", "qwen2.5-{0}"),
    (r"mistral-7b", "mistral-7b"),
    (r"mixtral-8x7b", "mixtral-8x7b"),
)


def builtin_names() -> list[str]:
    return sorted(_BUILTIN_CONFIGS)


def _builtin_key(name: str) -> str | None:
    """Map 'meta-llama/Meta-Llama-3.1-70B-Instruct' and friends to a table key."""
    short = name.strip().lower().split("/")[-1].replace("_", "-").replace("meta-llama-", "llama-")
    if short in _BUILTIN_CONFIGS:
        return short
    for pattern, key in _NAME_PATTERNS:
        m = re.search(pattern, short)
        if m:
            candidate = key.format(*m.groups())
            if candidate == "llama-3-405b":
                candidate = "llama-3.1-405b"
            return candidate if candidate in _BUILTIN_CONFIGS else None
    return None


def load_model_profile(name_or_path: str, quantization: str | None = None) -> ModelProfile:
    """Profile of a local model folder / config.json, or of a built-in architecture by name.

    `quantization` (bf16, fp16, fp8, int8, int4) overrides the weight format found in the config.
    """
    if quantization is not None and quantization.lower() not in WEIGHT_BYTES:
        raise UserError(
            f"unknown quantization {quantization!r}; known: {', '.join(QUANTIZATIONS)}"
        )
    path = Path(name_or_path).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.is_file():
        return profile_from_config(_read_config(config_file), str(name_or_path), quantization)
    if path.is_dir():
        raise UserError(f"model folder {name_or_path!r} has no config.json")
    key = _builtin_key(name_or_path)
    if key is None:
        raise UserError(
            f"unknown model {name_or_path!r}: not a local folder with config.json, nor a "
            f"built-in architecture ({', '.join(builtin_names())})"
        )
    return profile_from_config(_BUILTIN_CONFIGS[key], key, quantization)


def _read_config(config_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read model config {config_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"model config {config_file} is not a JSON object")
    return data


def profile_from_config(
    cfg: Mapping[str, Any], name: str, quantization: str | None = None
) -> ModelProfile:
    """Derive a profile from Hugging Face config keys (Llama / Qwen2 / Mistral / Mixtral)."""
    cfg = dict(cfg.get("text_config") or {}, **cfg) if "text_config" in cfg else dict(cfg)
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config of {name!r} lacks {exc}; is it a decoder LLM?") from exc
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    vocab = int(cfg.get("vocab_size") or 32000)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    topk = int(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1
    moe_inter = int(cfg.get("moe_intermediate_size") or inter)
    tie = bool(cfg.get("tie_word_embeddings", False))
    bias = bool(cfg.get("attention_bias", False))

    attn = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    if bias:
        attn += heads * head_dim + 2 * kv_heads * head_dim
    expert = 3 * hidden * moe_inter
    mlp_all = expert * experts + (hidden * experts if experts > 1 else 0)
    mlp_active = expert * topk + (hidden * experts if experts > 1 else 0)
    per_layer_fixed = attn + 2 * hidden
    embed = vocab * hidden * (1 if tie else 2) + hidden
    params = layers * (per_layer_fixed + mlp_all) + embed
    active = layers * (per_layer_fixed + mlp_active) + embed
    return ModelProfile(
        name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=inter, vocab=vocab,
        max_position=int(cfg.get("max_position_embeddings") or 2048),
        params=params, active_params=active,
        expert_params=layers * expert * experts if experts > 1 else 0,
        num_experts=experts, experts_per_tok=topk, tie_embeddings=tie,
        quantization=(quantization or _config_format(cfg)).lower(),
        checkpoint_format=_config_format(cfg),
    )


def _config_format(cfg: Mapping[str, Any]) -> str:
    """Weight format a checkpoint declares: its quantization_config, else its torch dtype."""
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return "fp8"
    if method in ("awq", "gptq", "marlin"):
        return "int4" if int(qc.get("bits", 4)) == 4 else "int8"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower()
    return {"float32": "fp32", "float16": "fp16", "half": "fp16"}.get(dtype, "bf16")
