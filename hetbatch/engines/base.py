"""The interface a worker drives: feed requests one at a time, step, collect finished ones.

Both the real vLLM engine and the simulated engine implement it, so the worker loop is one code
path. The interface is incremental (add/step) rather than one blocking `generate` call so that a
worker keeps the engine's batch full across work-unit boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at one position, as vLLM ranks it (rank 1 is the likeliest)."""

    token_id: int
    token: str
    logprob: float
    rank: int


@dataclass(frozen=True)
class Sample:
    """One of a request's `n` completions. Log-probabilities are present only when asked for
    (`logprobs` in the sampling parameters): per generated token, the sampled token's and the
    top candidates'."""

    text: str
    completion_tokens: int
    finish_reason: str
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    tokens: list[str] | None = None  # the sampled tokens' text, with the log-probabilities


@dataclass(frozen=True)
class Completion:
    """One finished request. `text` and `finish_reason` are the first sample's and
    `completion_tokens` counts all samples; `samples` holds each of the `n` samples (empty
    from engines that make one sample and say nothing more)."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    samples: tuple[Sample, ...] = ()
    prompt_logprobs: list[float | None] | None = None  # per prompt token; the first is None
    prompt_top_logprobs: list[list[TopLogprob]] | None = None
    vector: list[float] | None = None  # pooling tasks: the embedding or the class scores


@dataclass(frozen=True)
class EngineLoad:
    """What the engine reports of itself at its last step: requests it runs, requests queued
    inside it, and the share of its KV cache in use (0 to 1)."""

    running: int
    waiting: int
    kv_cache_usage: float


@dataclass(frozen=True)
class EngineRequest:
    """One prompt to generate from, with its sampling parameters (vLLM SamplingParams fields)."""

    request_id: str
    prompt: str
    sampling: dict[str, Any] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None  # when given, the engine skips tokenizing
    adapter: tuple[str, int, str] | None = None  # LoRA: name, vLLM id, local folder


class RequestRejected(Exception):
    """The engine refused this one request (e.g. prompt longer than the context); the row gets
    the message as its `error` and the job carries on."""


class Engine(Protocol):
    name: str

    def add(self, request: EngineRequest) -> None:
        """Queue one request; raise RequestRejected if this request alone is invalid."""

    def step(self) -> list[Completion]:
        """Advance the engine by one scheduling step; return the requests that finished."""

    def has_unfinished(self) -> bool: ...

    def abort(self, request_ids: list[str]) -> None: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages into one prompt string with the model's chat template."""

    def encode_batch(
        self, prompts: list[str], add_special_tokens: bool = True
    ) -> list[list[int]] | None:
        """Token ids of many prompts at once, off the engine's thread (None: the engine
        tokenizes each prompt itself when it is added). Without `add_special_tokens` the text
        is taken as it is (a chat template that writes its own special tokens)."""

    def close(self) -> None: ...

    def load(self) -> EngineLoad | None:
        """The engine's own figures at its last step (None before the first)."""

    @property
    def max_concurrency(self) -> int:
        """How many requests the engine runs at once (vLLM's max_num_seqs)."""
