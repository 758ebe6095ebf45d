"""The interface a worker drives: feed requests one at a time, step, collect finished ones.

Both the real vLLM engine and the simulated engine implement it, so the worker loop is one code
path. The interface is incremental (add/step) rather than one blocking `generate` call so that a
worker keeps the engine's batch full across work-unit boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Completion:
    """One finished request."""

    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class EngineRequest:
    """One prompt to generate from, with its sampling parameters (vLLM SamplingParams fields)."""

    request_id: str
    prompt: str
    sampling: dict[str, Any] = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None  # when given, the engine skips tokenizing


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

    def encode_batch(self, prompts: list[str]) -> list[list[int]] | None:
        """Token ids of many prompts at once, off the engine's thread (None: the engine
        tokenizes each prompt itself when it is added)."""

    def close(self) -> None: ...

    @property
    def max_concurrency(self) -> int:
        """How many requests the engine runs at once (vLLM's max_num_seqs)."""
