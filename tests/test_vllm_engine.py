"""The vLLM adapter against the real engine on the CPU, with the tiny random-weight model.

Engines in one process share vLLM's process-wide distributed state when they run in-process,
and closing one tears it down for all of them; so the engines here stay open until the module
ends, and closing is tested in a separate process.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hetbatch.engines.base import Completion, EngineRequest, RequestRejected
from hetbatch.engines.vllm_engine import VllmEngine, vllm_version

pytestmark = pytest.mark.vllm

ENGINE_ARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 512,
    "kv_cache_memory_bytes": 64 << 20,
}
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
PROMPTS = [
    "What is the river?",
    "Summarise the following text: the old man saw a large fish near the farm.",
    "Translate this English text into German: the dog found a red book.",
    "Give 3 ideas for a story about trains.",
]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[VllmEngine]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    eng = VllmEngine(str(tiny_model), ENGINE_ARGS)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def other_engine(tiny_model: Path, engine: VllmEngine) -> Iterator[VllmEngine]:
    """A second engine with a different batch limit, alongside the first."""
    eng = VllmEngine(str(tiny_model), {**ENGINE_ARGS, "max_num_seqs": 2}, name="other")
    yield eng
    eng.close()


def run(engine: VllmEngine, requests: list[EngineRequest]) -> dict[str, Completion]:
    """Add all requests, step until the engine is idle, return completions by id."""
    for request in requests:
        engine.add(request)
    done: dict[str, Completion] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            return done
        for completion in engine.step():
            assert completion.request_id not in done
            done[completion.request_id] = completion
    raise AssertionError("engine did not finish")


def requests(prefix: str, sampling: dict[str, Any]) -> list[EngineRequest]:
    return [EngineRequest(f"{prefix}-{i}", p, sampling) for i, p in enumerate(PROMPTS)]


def test_unset_batch_limits_are_vllm_offline_defaults(engine: VllmEngine) -> None:
    """As vLLM's offline `LLM` class sets them on the CPU, not its context-free 128/2048."""
    config = engine._engine.vllm_config.scheduler_config
    assert (engine.max_concurrency, config.max_num_batched_tokens) == (256, 4096)


def test_one_completion_per_request(engine: VllmEngine) -> None:
    done = run(engine, requests("basic", GREEDY))
    assert sorted(done) == [f"basic-{i}" for i in range(len(PROMPTS))]
    for completion in done.values():
        assert completion.prompt_tokens > 1  # BOS plus the prompt
        assert completion.completion_tokens == GREEDY["max_tokens"]
        assert completion.finish_reason == "length"
        assert isinstance(completion.text, str)


def test_greedy_is_deterministic_across_engines(
    engine: VllmEngine, other_engine: VllmEngine
) -> None:
    assert other_engine.max_concurrency == 2
    first = run(engine, requests("greedy", GREEDY))
    second = run(other_engine, requests("greedy", GREEDY))
    assert {k: v.text for k, v in first.items()} == {k: v.text for k, v in second.items()}


def test_seeded_sampling_repeats(engine: VllmEngine) -> None:
    def sample(request_id: str, seed: int) -> str:
        sampling = {"temperature": 1.0, "seed": seed, "max_tokens": 24, "ignore_eos": True}
        return run(engine, [EngineRequest(request_id, PROMPTS[0], sampling)])[request_id].text

    assert sample("seeded-a", 7) == sample("seeded-b", 7)
    assert sample("seeded-c", 8) != sample("seeded-a", 7)


def test_too_long_prompt_is_rejected_at_add_time(engine: VllmEngine) -> None:
    with pytest.raises(RequestRejected) as info:
        engine.add(EngineRequest("long", "word " * 900, GREEDY))
    message = str(info.value)
    assert re.fullmatch(r"prompt is 9\d\d tokens, longer than the model's context of 512", message)
    assert not engine.has_unfinished()
    assert "after-long" in run(engine, [EngineRequest("after-long", PROMPTS[0], GREEDY)])


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("~" * 511, "prompt is 512 tokens, which leaves no room for output"),  # BOS + 511
        ("x" * 100_000, "prompt is 100000 characters, far longer than the model's context"),
    ],
)
def test_prompts_without_room_are_rejected(engine: VllmEngine, prompt: str, expected: str) -> None:
    with pytest.raises(RequestRejected, match=expected):
        engine.add(EngineRequest("no-room", prompt, GREEDY))


@pytest.mark.parametrize(
    ("sampling", "expected"),
    [
        ({"temperature": -1.0}, "temperature must be non-negative"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"no_such_param": 1}, "no_such_param"),
    ],
)
def test_invalid_sampling_is_rejected(
    engine: VllmEngine, sampling: dict[str, Any], expected: str
) -> None:
    with pytest.raises(RequestRejected, match=f"invalid sampling parameters: .*{expected}"):
        engine.add(EngineRequest("bad-sampling", PROMPTS[0], sampling))


def test_output_longer_than_context_is_cut_not_rejected(engine: VllmEngine) -> None:
    sampling = {"max_tokens": 1000, "ignore_eos": True, "temperature": 0.0}
    done = run(engine, [EngineRequest("capped", PROMPTS[0], sampling)])["capped"]
    assert done.prompt_tokens + done.completion_tokens == 512
    assert done.finish_reason == "length"


def test_duplicate_running_id_is_refused(engine: VllmEngine) -> None:
    engine.add(EngineRequest("dup", PROMPTS[0], GREEDY))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add(EngineRequest("dup", PROMPTS[1], GREEDY))
    assert list(run(engine, [])) == ["dup"]


def test_chat_template_renders_messages(engine: VllmEngine) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the sea?"},
    ]
    prompt = engine.apply_chat_template(messages)
    assert prompt == "<|system|>\nBe brief.</s>\n<|user|>\nWhat is the sea?</s>\n<|assistant|>\n"
    assert run(engine, [EngineRequest("chat", prompt, GREEDY)])["chat"].completion_tokens == 8


def test_abort_removes_request(engine: VllmEngine) -> None:
    long = {"temperature": 0.0, "max_tokens": 64, "ignore_eos": True}
    engine.add(EngineRequest("keep", PROMPTS[0], long))
    engine.add(EngineRequest("drop", PROMPTS[1], long))
    assert engine.step() == []
    engine.abort(["drop", "never-added"])
    done = run(engine, [])
    assert list(done) == ["keep"]
    assert done["keep"].completion_tokens == 64


def test_close_is_idempotent(tiny_model: Path) -> None:
    script = f"""
import pytest
from hetbatch.engines.base import EngineRequest
from hetbatch.engines.vllm_engine import VllmEngine

engine = VllmEngine({str(tiny_model)!r}, {ENGINE_ARGS!r})
assert engine.max_concurrency > 0
engine.add(EngineRequest("left-running", "hello", {{"max_tokens": 64}}))
engine.close()
engine.close()
assert not engine.has_unfinished()
with pytest.raises(RuntimeError, match="closed"):
    engine.add(EngineRequest("late", "hello", {{}}))
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=120)


def test_version_without_importing_vllm() -> None:
    code = (
        "import sys; from hetbatch.engines.vllm_engine import vllm_version; "
        "v = vllm_version(); assert 'vllm' not in sys.modules, 'imported'; print(v)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == vllm_version()
    assert re.match(r"\d+\.\d+", out.stdout)


def test_pretokenized_prompts_generate_the_same(engine: VllmEngine) -> None:
    """Token ids from encode_batch stand in for the text: same prompt length, same output."""
    text = requests("txt", {"max_tokens": 12, "temperature": 0})
    ids = engine.encode_batch([r.prompt for r in text])
    assert ids is not None and len(ids) == len(text)
    tokens = [
        EngineRequest(f"ids-{r.request_id}", r.prompt, r.sampling, i)
        for r, i in zip(text, ids, strict=True)
    ]
    by_text, by_ids = run(engine, text), run(engine, tokens)
    for r in text:
        a, b = by_text[r.request_id], by_ids[f"ids-{r.request_id}"]
        assert (a.text, a.prompt_tokens) == (b.text, b.prompt_tokens)


def test_pretokenized_too_long_prompt_is_rejected(engine: VllmEngine) -> None:
    ids = engine.encode_batch(["many words " * 600])[0]
    with pytest.raises(RequestRejected, match=r"prompt is \d+ tokens, longer than the model's"):
        engine.add(EngineRequest("long-ids", "many words " * 600, {"max_tokens": 4}, ids))


def test_load_reports_vllm_scheduler_figures(engine: VllmEngine) -> None:
    """The engine's own figures (from vLLM's stat-logger hook): requests running and waiting
    in the engine and its KV-cache use, as of the last step."""
    for i in range(3):
        engine.add(EngineRequest(f"load-{i}", PROMPTS[i], {**GREEDY, "max_tokens": 32}))
    engine.step()
    busy = engine.load()
    assert busy is not None
    assert busy.running + busy.waiting == 3
    assert busy.running >= 1 and 0 < busy.kv_cache_usage <= 1
    while engine.has_unfinished():
        engine.step()
    idle = engine.load()
    assert idle is not None and idle.running == 0 and idle.waiting == 0
