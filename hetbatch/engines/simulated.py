"""A simulated engine in real time: deterministic text at a configurable speed.

It stands in for vLLM in scheduler and fault tests and lets one CPU machine emulate a mixed
cluster (a fast pool beside a slow one). Like a real decode step, one step costs about the same
whether the batch is full or not, so throughput grows with the number of requests in flight up
to `max_num_seqs`, where it reaches `tokens_per_s`.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from hetbatch.engines.base import Completion, EngineLoad, EngineRequest, RequestRejected

_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
]


def approx_tokens(text: str) -> int:
    """A tokenizer-free token count, about four bytes a token."""
    return max(1, len(text.encode()) // 4)


def sim_text(prompt: str, seed: int | None, n_tokens: int) -> str:
    """Deterministic words from the prompt and the seed, so results do not depend on placement."""
    digest = hashlib.blake2b(f"{seed}|{prompt}".encode(), digest_size=32).digest()
    return " ".join(_WORDS[digest[i % 32] % len(_WORDS)] for i in range(n_tokens))


# Steps of about 20 ms keep the simulated engine's sleeps coarse enough to be accurate.
_STEP_TARGET_S = 0.02


def step_quantum(tokens_per_s: float, max_num_seqs: int) -> int:
    """Tokens each running request gains per step of the simulated engine."""
    return max(1, round(_STEP_TARGET_S * tokens_per_s / max_num_seqs))


def step_seconds(tokens_per_s: float, max_num_seqs: int) -> float:
    """How long one step of the simulated engine takes, full batch or not."""
    return step_quantum(tokens_per_s, max_num_seqs) * max_num_seqs / tokens_per_s


def delivered_speed(tokens_per_s: float, max_num_seqs: int, out_tokens: int) -> float:
    """Output tokens/s the simulated engine really delivers at a full batch of requests of
    `out_tokens` tokens: it bills whole steps, so 8-token requests at a quantum of 12 run at
    8/12 of `tokens_per_s`."""
    quantum = step_quantum(tokens_per_s, max_num_seqs)
    return tokens_per_s * out_tokens / (math.ceil(out_tokens / quantum) * quantum)


@dataclass
class _Running:
    request: EngineRequest
    prompt_tokens: int
    target: int
    generated: int = 0


class SimEngine:
    """Continuous batching over a simulated clock that really sleeps."""

    def __init__(
        self,
        tokens_per_s: float,
        max_num_seqs: int = 64,
        max_model_len: int = 4096,
        name: str = "sim",
        sleep: Callable[[float], None] = time.sleep,
        hang_file: str | None = None,
    ) -> None:
        self.name = name
        self.hang_file = hang_file
        self.tokens_per_s = tokens_per_s
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self._sleep = sleep
        self._waiting: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}
        self._quantum = step_quantum(tokens_per_s, max_num_seqs)
        self._step_s = step_seconds(tokens_per_s, max_num_seqs)

    @property
    def max_concurrency(self) -> int:
        return self.max_num_seqs

    def add(self, request: EngineRequest) -> None:
        if not request.prompt:
            raise RequestRejected("empty prompt")
        n = approx_tokens(request.prompt)
        target = int(request.sampling.get("max_tokens", 16))
        if n + target > self.max_model_len:
            raise RequestRejected(
                f"prompt is {n} tokens, longer than the model's context of {self.max_model_len}"
            )
        self._waiting.append(_Running(request, n, target))

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def load(self) -> EngineLoad:
        """A batch slot stands for the KV cache: its use is the share of slots taken."""
        running = len(self._running)
        return EngineLoad(running, len(self._waiting), running / self.max_num_seqs)

    def abort(self, request_ids: list[str]) -> None:
        ids = set(request_ids)
        self._waiting = deque(r for r in self._waiting if r.request.request_id not in ids)
        for rid in ids:
            self._running.pop(rid, None)

    def step(self) -> list[Completion]:
        while self._waiting and len(self._running) < self.max_num_seqs:
            r = self._waiting.popleft()
            self._running[r.request.request_id] = r
        if not self._running:
            return []
        self._maybe_hang()
        self._sleep(self._step_s)
        finished = []
        for rid, r in list(self._running.items()):
            r.generated = min(r.target, r.generated + self._quantum)
            if r.generated >= r.target:
                del self._running[rid]
                finished.append(self._complete(r))
        return finished

    def _maybe_hang(self) -> None:
        """The fault-test switch: the engine that claims the hang file (removing it, so that
        only one engine hangs, once) never returns from this step, as a wedged GPU would not."""
        if self.hang_file is None:
            return
        try:
            os.remove(self.hang_file)
        except FileNotFoundError:
            return
        threading.Event().wait()

    def _complete(self, r: _Running) -> Completion:
        seed = r.request.sampling.get("seed")
        return Completion(
            r.request.request_id,
            sim_text(r.request.prompt, seed, r.target),
            r.prompt_tokens,
            r.target,
            "length",
        )

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"

    def encode_batch(
        self, prompts: list[str], add_special_tokens: bool = True
    ) -> list[list[int]] | None:
        return None

    def close(self) -> None:
        self._waiting.clear()
        self._running.clear()
