"""Prefix order on real vLLM (CPU, prefix caching on): rows that share long system prompts.

The input: `--rows` rows over `--prompts` system prompts of about 300 tokens each, plus a short
question, in random order. Three runs in one go, all on the same engine arguments (the tiny
model, vLLM's automatic prefix caching on, a KV cache of `--kv-mib`):
  - bare vLLM: one `LLM.generate` call on the rows in input order, one engine on one core,
    with the per-row seeds hetbatch gives (as `bench/overhead.py` does);
  - hetbatch without prefix order (`scheduler.prefix_groups: false`);
  - hetbatch with it (`prefix_groups: true`).
hetbatch runs `--instances` instances, one pinned core each. Throughput is rows per second of
generation: from engine ready to the last result (bare), from the first lease to the last
commit (hetbatch); the two hetbatch sides alternate for `--repeats` rounds and the
median ratio is printed. Target: hetbatch with prefix order at least 1.3x hetbatch without it.

    python bench/prefix.py [--rows 5000] [--prompts 25] [--kv-mib 64] [--instances 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.3
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0",
       "VLLM_LOGGING_LEVEL": "WARNING"}

BARE = r'''
import json, sys, time
import pyarrow.parquet as pq
from vllm import LLM, SamplingParams
from hetbatch.prompts import row_seed
job = json.loads(sys.argv[1])
prompts = pq.read_table(job["input"]["path"], columns=["prompt"]).column("prompt").to_pylist()
ids = pq.read_table(job["input"]["path"], columns=["id"]).column("id").to_pylist()
params = [SamplingParams(**job["sampling"], seed=row_seed(job["seed"], k)) for k in ids]
llm = LLM(job["model"]["path"], **job["model"]["engine_args"])
t0 = time.monotonic()
outs = llm.generate(prompts, params, use_tqdm=False)
gen_s = time.monotonic() - t0
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
cached = sum(o.num_cached_tokens or 0 for o in outs)
prompt = sum(len(o.prompt_token_ids) for o in outs)
print(json.dumps({"rows": len(outs), "tokens": tokens, "gen_s": gen_s,
                  "cached": cached / prompt}))
'''


def load_builder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build", ROOT / "data" / "build_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_input(path: Path, model: Path, rows: int, prompts: int, prefix_tokens: int) -> None:
    """System prompts of `prefix_tokens` tokens (common English words), each row one of them
    plus a question of 8 to 24 words, in random order."""
    from transformers import AutoTokenizer

    words = load_builder().WORDS
    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)

    def system_prompt() -> str:
        text: list[str] = []
        while len(tok(" ".join(text))["input_ids"]) < prefix_tokens:
            text.append(rng.choice(words))
        return " ".join(text)

    systems = [system_prompt() for _ in range(prompts)]
    picks = [rng.randrange(prompts) for _ in range(rows)]
    texts = [
        f"{systems[g]}\n\nQuestion: {' '.join(rng.choices(words, k=rng.randint(8, 24)))}\nAnswer:"
        for g in picks
    ]
    table = pa.table({"id": [f"r{i:06d}" for i in range(rows)], "prompt": texts, "group": picks})
    pq.write_table(table, path, row_group_size=1000)


def job_for(tmp: Path, model: Path, args: argparse.Namespace, prefix_groups: bool) -> dict:
    return {
        "model": {"path": str(model), "engine_args": {
            "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
            "kv_cache_memory_bytes": args.kv_mib << 20, "max_num_seqs": args.max_num_seqs,
            "enable_prefix_caching": True,
        }},
        "input": {"path": str(tmp / "in.parquet"), "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True},
        "seed": 0,
        "output": {"path": str(tmp / f"out-{prefix_groups}")},
        "scheduler": {"max_unit_rows": args.unit_rows, "prefix_groups": prefix_groups},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu",
                               "devices_per_node": args.instances,
                               "tensor_parallel_size": 1}]},
    }


def run_bare(job: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", BARE, json.dumps(job)], env=ENV, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["rows_per_s"] = result["rows"] / result["gen_s"]
    return result


def run_hetbatch(tmp: Path, job: dict, name: str) -> dict:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "hetbatch", "run", str(path), "--overwrite",
                    "--no-progress"], env=ENV, check=True, capture_output=True)
    wall = time.monotonic() - t0
    out = Path(job["output"]["path"])
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    instances = metrics["instances"].values()
    gen_s = max(i["last_commit_s"] for i in instances) - min(i["first_lease_s"] for i in instances)
    rows = sum(i["rows"] for i in instances)
    order = json.loads((out / "_hetbatch" / "job.json").read_text())["prefix_window_rows"]
    return {"rows": rows, "gen_s": gen_s, "wall_s": wall, "rows_per_s": rows / gen_s,
            "prefix_window_rows": order}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=25)
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-mib", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--unit-rows", type=int, default=500)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = load_builder().build(ROOT / "data" / "tiny-model")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        make_input(tmp / "in.parquet", model, args.rows, args.prompts, args.prefix_tokens)
        bare = run_bare(job_for(tmp, model, args, False))
        print(f"bare vLLM, input order, 1 engine: {bare['rows_per_s']:7.1f} rows/s "
              f"({bare['gen_s']:.1f} s, prompt tokens from cache {bare['cached']:.0%})",
              flush=True)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for k in range(args.repeats):
            # Alternate which side goes first: the machine's load drifts between runs.
            for grouped in (False, True) if k % 2 == 0 else (True, False):
                r = run_hetbatch(tmp, job_for(tmp, model, args, grouped), str(grouped))
                assert r["rows"] == args.rows, r
                assert (r["prefix_window_rows"] is not None) == grouped, r
                runs[grouped].append(r)
                label = "with" if grouped else "without"
                print(f"round {k + 1}: hetbatch {label:7} prefix order, {args.instances} "
                      f"instance(s): {r['rows_per_s']:7.1f} rows/s ({r['gen_s']:.1f} s, "
                      f"wall {r['wall_s']:.1f} s)", flush=True)
    ratio = statistics.median(
        on["rows_per_s"] / off["rows_per_s"] for on, off in zip(runs[True], runs[False],
                                                                  strict=True))
    on_rate = statistics.median(r["rows_per_s"] for r in runs[True])
    off_rate = statistics.median(r["rows_per_s"] for r in runs[False])
    print(f"{args.rows} rows over {args.prompts} prompts of {args.prefix_tokens} tokens, "
          f"random order, KV cache {args.kv_mib} MiB, max_tokens {args.max_tokens}, "
          f"median of {args.repeats} rounds")
    print(f"prefix order on/off:  {ratio:.2f}x  (target >= {TARGET}x: "
          f"{'met' if ratio >= TARGET else 'NOT met'})")
    print(f"hetbatch on / bare vLLM:  {on_rate / bare['rows_per_s']:.2f}x")
    print(f"hetbatch off / bare vLLM: {off_rate / bare['rows_per_s']:.2f}x")

if __name__ == "__main__":
    main()
