"""LoRA adapters per row on real vLLM (CPU): vLLM 0.32's CPU backend runs LoRA (its Punica CPU
wrapper); the adapters are built here in PEFT's format for the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobutil import TINY_ENGINE_ARGS, read_output, run_cli, write_job

pytestmark = pytest.mark.vllm
RANK = 8


def build_adapter(model: Path, folder: Path, seed: int) -> Path:
    """A random rank-8 LoRA on q_proj and v_proj of every layer, as PEFT saves one."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_out = config["num_key_value_heads"] * hidden // heads
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, out in (("q_proj", hidden), ("v_proj", kv_out)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) / 2
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=generator) / 2
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "lora_dropout": 0.0,
        "fan_in_fan_out": False, "base_model_name_or_path": str(model),
    }))
    return folder


def test_rows_run_their_own_adapter(tmp_path, tiny_model) -> None:
    """Rows name an adapter (or none, or an unknown one) in a column; each row's greedy
    completion is the one vLLM gives that prompt with that adapter, on either instance; the same
    requests as OpenAI batch lines name the adapter in body.model and get the same texts."""
    adapters = {name: str(build_adapter(tiny_model, tmp_path / name, seed))
                for seed, name in enumerate(["alpha", "beta"])}
    prompts = ["The sea is", "Hello there", "Once upon a time", "Bridges are"]
    names = [None, "alpha", "beta"]
    rows = [(f"r{i:03d}", prompts[i % 4], names[i % 3]) for i in range(60)]
    rows.append(("bad", "The sea is", "gamma"))
    ids, texts, chosen = map(list, zip(*rows, strict=True))
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ids, "prompt": texts, "adapter": chosen}), src)
    job = {
        "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "prompt_column": "prompt", "id_column": "id"},
        "lora": {"adapters": adapters, "column": "adapter", "max_lora_rank": RANK},
        "sampling": {"max_tokens": 10, "temperature": 0},
        "output": {"path": str(tmp_path / "out")},
        "scheduler": {"max_unit_rows": 8, "min_unit_rows": 4, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2,
                               "tensor_parallel_size": 1}]},
    }
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    df = read_output(tmp_path / "out")
    assert df.height == 61
    bad = df.filter(df["id"] == "bad").row(0, named=True)
    assert bad["error"] == "adapter: unknown LoRA adapter 'gamma' (known: alpha, beta)"
    got: dict[tuple[str, str | None], set[str]] = {}
    by_id = {r["id"]: r for r in df.iter_rows(named=True)}
    for row_id, text, name in rows[:-1]:
        assert by_id[row_id]["error"] is None
        got.setdefault((text, name), set()).add(by_id[row_id]["generated_text"])
    assert all(len(v) == 1 for v in got.values())  # one completion per prompt and adapter

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(str(tiny_model), enable_lora=True, max_lora_rank=RANK, max_loras=2,
              enable_chunked_prefill=False, **TINY_ENGINE_ARGS)
    params = SamplingParams(max_tokens=10, temperature=0)
    for i, name in enumerate(names):
        lora = None if name is None else LoRARequest(name, i, adapters[name])
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        for prompt, out in zip(prompts, outs, strict=True):
            assert got[(prompt, name)] == {out.outputs[0].text}, (prompt, name)
    per_prompt = [{next(iter(got[(p, n)])) for n in names} for p in prompts]
    assert all(len(texts) == 3 for texts in per_prompt)  # the adapters change the output
    llm.llm_engine.engine_core.shutdown()

    lines = [json.dumps({"custom_id": row_id, "method": "POST", "url": "/v1/completions",
                         "body": {"model": name or "base", "prompt": text}})
             for row_id, text, name in rows[:-1]]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    job["input"] = {"path": str(tmp_path / "requests.jsonl"), "format": "openai-batch"}
    job["lora"] = {"adapters": adapters, "max_lora_rank": RANK}
    job["output"] = {"path": str(tmp_path / "openai"), "format": "openai-batch"}
    result = run_cli("run", str(write_job(tmp_path / "openai.yaml", job)))
    assert result.returncode == 0, result.stderr
    answers = {}
    for shard in (tmp_path / "openai").glob("part-*.jsonl"):
        for line in shard.read_text().splitlines():
            answer = json.loads(line)
            answers[answer["custom_id"]] = answer["response"]["body"]["choices"][0]["text"]
    assert answers == {row_id: by_id[row_id]["generated_text"] for row_id, _, _ in rows[:-1]}
