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
    # Multi-head latent attention (DeepSeek): elements of the one compressed K/V latent cached
    # per token and layer; every TP rank holds it whole. 0 for ordinary attention.
    kv_latent: int = 0
    # Sliding-window (or chunked local) attention: `window_layers` of the layers attend to, and
    # cache, only the last `window` tokens (vLLM allocates them that much).
    window: int = 0
    window_layers: int = 0
    attn_dim: int = 0  # width of one head's score and value products; 0: head_dim

    @property
    def kv_elems_per_layer(self) -> int:
        """K and V elements cached per token in one layer (all heads)."""
        return self.kv_latent or 2 * self.kv_heads * self.head_dim

    def kv_layers_at(self, context: float | None) -> float:
        """Layers' worth of cache a token holds in a sequence of `context` tokens: windowed
        layers keep only the last `window` tokens (None: a full-length worst case)."""
        if not self.window_layers or not context or context <= self.window:
            return float(self.layers)
        return self.layers - self.window_layers * (1 - self.window / context)

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
        """K and V for one token across all layers (windowed layers counted whole)."""
        return self.layers * self.kv_elems_per_layer * self.kv_dtype_bytes

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
            "window": self.window, "window_layers": self.window_layers,
            "kv_latent": self.kv_latent,
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
    "qwen3-4b": _llama(2560, 36, 32, 8, 9728, 151936, 40960, head_dim=128,
                       tie_word_embeddings=True),
    "qwen3-8b": _llama(4096, 36, 32, 8, 12288, 151936, 40960, head_dim=128),
    "qwen3-14b": _llama(5120, 40, 40, 8, 17408, 151936, 40960, head_dim=128),
    "qwen3-32b": _llama(5120, 64, 64, 8, 25600, 151936, 40960, head_dim=128),
    "qwen3-30b-a3b": _llama(2048, 48, 32, 4, 6144, 151936, 40960, head_dim=128,
                            num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "qwen3-235b-a22b": _llama(4096, 94, 64, 4, 12288, 151936, 40960, head_dim=128,
                              num_experts=128, num_experts_per_tok=8,
                              moe_intermediate_size=1536),
    "gemma-3-4b": _llama(2560, 34, 8, 4, 10240, 262208, 131072, head_dim=256,
                         tie_word_embeddings=True, sliding_window=1024,
                         sliding_window_pattern=6),
    "gemma-3-12b": _llama(3840, 48, 16, 8, 15360, 262208, 131072, head_dim=256,
                          tie_word_embeddings=True, sliding_window=1024,
                          sliding_window_pattern=6),
    "gemma-3-27b": _llama(5376, 62, 32, 16, 21504, 262208, 131072, head_dim=128,
                          tie_word_embeddings=True, sliding_window=1024,
                          sliding_window_pattern=6),
    "deepseek-v3": _llama(7168, 61, 128, 128, 18432, 129280, 163840, n_routed_experts=256,
                          num_experts_per_tok=8, n_shared_experts=1, moe_intermediate_size=2048,
                          first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
                          qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                          quantization_config={"quant_method": "fp8"}),
    "llama-4-scout": _llama(5120, 48, 40, 8, 8192, 202048, 10485760, head_dim=128,
                            num_local_experts=16, num_experts_per_tok=1,
                            intermediate_size_mlp=16384, interleave_moe_layer_step=1,
                            attention_chunk_size=8192),
    "llama-4-maverick": _llama(5120, 48, 40, 8, 8192, 202048, 1048576, head_dim=128,
                               num_local_experts=128, num_experts_per_tok=1,
                               intermediate_size_mlp=16384, interleave_moe_layer_step=2,
                               attention_chunk_size=8192),
}

_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"llama-?3\.[123]-(8b|70b|405b)", "llama-3.1-{0}"),
    (r"llama-?3-(8b|70b|405b)", "llama-3-{0}"),
    (r"llama-?2-(7b|13b|70b)", "llama-2-{0}"),
    (r"qwen2\.5-(7b|14b|32b|72b)", "qwen2.5-{0}"),
    (r"mistral-7b", "mistral-7b"),
    (r"mixtral-8x7b", "mixtral-8x7b"),
    (r"qwen3-(30b-a3b|235b-a22b)", "qwen3-{0}"),
    (r"qwen3-(4b|8b|14b|32b)", "qwen3-{0}"),
    (r"gemma-?3-(4b|12b|27b)", "gemma-3-{0}"),
    (r"deepseek-(v3|r1)", "deepseek-v3"),
    (r"llama-?4-(scout|maverick)", "llama-4-{0}"),
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
    config = _BUILTIN_CONFIGS[key]
    if re.search(r"(^|[-_/])fp8($|[-_])", name_or_path.lower()):  # e.g. ...-Instruct-FP8
        config = {**config, "quantization_config": {"quant_method": "fp8"}}
    return profile_from_config(config, key, quantization)


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
    """Derive a profile from Hugging Face config keys: Llama, Qwen2/3 (dense and MoE), Mistral,
    Mixtral, Gemma 3 (sliding window), DeepSeek-V3 (latent attention, shared experts, dense
    first layers) and Llama 4 (chunked attention, interleaved MoE with a shared expert)."""
    cfg = dict(cfg.get("text_config") or {}, **cfg) if "text_config" in cfg else dict(cfg)
    try:
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model config of {name!r} lacks {exc}; is it a decoder LLM?") from exc
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(cfg.get("vocab_size") or 32000)
    tie = bool(cfg.get("tie_word_embeddings", False))
    attn, kv_latent, attn_dim = _attention(cfg, hidden, heads, kv_heads, head_dim)
    mlp = _mlp_shapes(cfg, hidden, layers)
    per_layer_fixed = attn + 2 * hidden
    embed = vocab * hidden * (1 if tie else 2) + hidden
    params = layers * per_layer_fixed + mlp.total + embed
    active = layers * per_layer_fixed + mlp.active + embed
    window, window_layers = _window(cfg, layers)
    return ModelProfile(
        name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=mlp.widest, vocab=vocab,
        max_position=int(cfg.get("max_position_embeddings") or 2048),
        params=params, active_params=active, expert_params=mlp.routed,
        num_experts=mlp.experts, experts_per_tok=mlp.topk, tie_embeddings=tie,
        quantization=(quantization or _config_format(cfg)).lower(),
        checkpoint_format=_config_format(cfg), kv_latent=kv_latent, window=window,
        window_layers=window_layers, attn_dim=attn_dim,
    )


def _attention(
    cfg: Mapping[str, Any], hidden: int, heads: int, kv_heads: int, head_dim: int
) -> tuple[int, int, int]:
    """(weights of one attention block, cached latent width or 0, per-head product width)."""
    if cfg.get("kv_lora_rank"):  # multi-head latent attention
        rank, rope = int(cfg["kv_lora_rank"]), int(cfg.get("qk_rope_head_dim") or 64)
        nope, v_dim = int(cfg.get("qk_nope_head_dim") or 128), int(cfg.get("v_head_dim") or 128)
        q_rank = int(cfg.get("q_lora_rank") or 0)
        q = (hidden * q_rank + q_rank * heads * (nope + rope)) if q_rank else (
            hidden * heads * (nope + rope))
        kv = hidden * (rank + rope) + rank * heads * (nope + v_dim)
        # decode runs the absorbed form: scores over rank + rope, values over rank
        return q + kv + heads * v_dim * hidden, rank + rope, (2 * rank + rope) // 2
    attn = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    if cfg.get("attention_bias"):
        attn += heads * head_dim + 2 * kv_heads * head_dim
    return attn, 0, 0


@dataclass(frozen=True)
class _Mlp:
    total: int  # MLP weights of all layers
    active: int  # used per token
    routed: int  # inside routed experts
    experts: int
    topk: int
    widest: int  # the largest intermediate width (activation peak)


def _mlp_shapes(cfg: Mapping[str, Any], hidden: int, layers: int) -> _Mlp:
    """Gated MLP weights: dense layers, and MoE layers' routed experts, shared experts and
    router. Which layers are MoE follows DeepSeek's first_k_dense_replace and Llama 4's
    interleave_moe_layer_step."""
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts")
                  or cfg.get("n_routed_experts") or 1)
    if experts <= 1:
        dense = 3 * hidden * inter * layers
        return _Mlp(dense, dense, 0, 1, 1, inter)
    topk = int(cfg.get("num_experts_per_tok") or 1)
    llama4 = "intermediate_size_mlp" in cfg
    expert_inter = inter if llama4 else int(cfg.get("moe_intermediate_size") or inter)
    dense_inter = int(cfg["intermediate_size_mlp"]) if llama4 else inter
    shared_inter = expert_inter * int(cfg.get("n_shared_experts") or (1 if llama4 else 0))
    shared_inter += int(cfg.get("shared_expert_intermediate_size") or 0)
    step = int(cfg.get("interleave_moe_layer_step") or cfg.get("decoder_sparse_step") or 1)
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    moe_layers = sum(1 for i in range(first_dense, layers) if (i + 1) % step == 0)
    dense_layers = layers - moe_layers
    expert = 3 * hidden * expert_inter
    fixed = 3 * hidden * shared_inter + hidden * experts  # shared experts and the router
    dense = 3 * hidden * dense_inter * dense_layers
    routed = moe_layers * expert * experts
    return _Mlp(
        total=dense + routed + moe_layers * fixed,
        active=dense + moe_layers * (expert * topk + fixed),
        routed=routed, experts=experts, topk=topk,
        widest=max(dense_inter if dense_layers else 0, expert_inter * topk + shared_inter),
    )


def _window(cfg: Mapping[str, Any], layers: int) -> tuple[int, int]:
    """(window, layers that use it): Gemma 3's sliding layers (all but every
    sliding_window_pattern-th, or as `layer_types` lists them), Llama 4's chunked layers (all
    but every fourth); models that switch the window off (Qwen's use_sliding_window) have none."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and cfg.get("sliding_window"):
        return int(cfg["sliding_window"]), sum(1 for t in types if "sliding" in str(t))
    if cfg.get("attention_chunk_size"):
        return int(cfg["attention_chunk_size"]), layers - layers // 4
    if cfg.get("sliding_window") and cfg.get("sliding_window_pattern"):
        pattern = int(cfg["sliding_window_pattern"])
        return int(cfg["sliding_window"]), layers - layers // pattern
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) and (
        "qwen" not in str(cfg.get("model_type", ""))
    ):
        return int(cfg["sliding_window"]), layers  # Mistral v0.1: every layer
    return 0, 0


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
