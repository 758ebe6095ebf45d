"""Prefix order on real vLLM (CPU, prefix caching on): rows that share long prompt prefixes.

Two inputs, each row a prefix of about `--prefix-tokens` tokens plus a short question, in
random order: `--dataset system` (the headline), `--rows` rows over `--prompts` system prompts;
`--dataset documents`, `--questions` questions on each of many documents (rows / questions),
more prefixes than the engine's KV cache holds. Three runs in one go, all on the same engine
arguments (the tiny model, vLLM's automatic prefix caching on, a KV cache of `--kv-mib`,
vLLM's default max_num_seqs unless `--max-num-seqs`):
  - bare vLLM: one `LLM.generate` call on the rows in input order, one engine,
    with the per-row seeds hetbatch gives (as `bench/overhead.py` does);
  - hetbatch without prefix order (`scheduler.prefix_groups: false`);
  - hetbatch with it (`prefix_groups: true`).
hetbatch runs `--instances` instances, one pinned core each. Throughput is rows per second of
generation: from engine ready to the last result (bare), from the first lease to the last
commit (hetbatch); the two hetbatch sides alternate for `--repeats` rounds, and the median
ratio and every round's are printed. Target: hetbatch with prefix order at least 1.3x
hetbatch without it.

    python bench/prefix.py [--dataset system|documents] [--rows 5000] [--prompts 25]
        [--questions 5] [--kv-mib 64] [--max-num-seqs 0] [--instances 1] [--repeats 3]
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


def make_input(path: Path, model: Path, args: argparse.Namespace) -> None:
    """Prefixes of `prefix_tokens` tokens (common English words), each row one of them plus a
    question of 8 to 24 words, in random order. `system`: `rows` rows over `prompts` system
    prompts. `documents`: `questions` questions on each of rows / questions documents."""
    from transformers import AutoTokenizer

    words = load_builder().WORDS
    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)

    def prefix() -> str:
        text: list[str] = []
        while len(tok(" ".join(text))["input_ids"]) < args.prefix_tokens:
            text.append(rng.choice(words))
        return " ".join(text)

    if args.dataset == "system":
        prefixes = [prefix() for _ in range(args.prompts)]
        picks = [rng.randrange(args.prompts) for _ in range(args.rows)]
    else:
        prefixes = [prefix() for _ in range(args.rows // args.questions)]
        picks = [d for d in range(len(prefixes)) for _ in range(args.questions)]
        rng.shuffle(picks)
    texts = [
        f"{prefixes[g]}\n\nQuestion: {' '.join(rng.choices(words, k=rng.randint(8, 24)))}\n"
        "Answer:"
        for g in picks
    ]
    table = pa.table({"id": [f"r{i:06d}" for i in range(len(texts))], "prompt": texts,
                      "group": picks})
    pq.write_table(table, path, row_group_size=1000)


def job_for(tmp: Path, model: Path, args: argparse.Namespace, prefix_groups: bool) -> dict:
    return {
        "model": {"path": str(model), "engine_args": {
            "dtype": "float32", "enforce_eager": True, "max_model_len": 512,
            "kv_cache_memory_bytes": args.kv_mib << 20, "enable_prefix_caching": True,
            **({"max_num_seqs": args.max_num_seqs} if args.max_num_seqs else {}),
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
    parser.add_argument("--dataset", choices=("system", "documents"), default="system")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=25, help="system prompts (system)")
    parser.add_argument("--questions", type=int, default=5,
                        help="questions per document (documents)")
    parser.add_argument("--prefix-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--kv-mib", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=0,
                        help="0: vLLM's default (256 on the CPU)")
    parser.add_argument("--unit-rows", type=int, default=500)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_builder().build(ROOT / "data" / "tiny-model")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        make_input(tmp / "in.parquet", model, args)
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
    ratios = sorted(on["rows_per_s"] / off["rows_per_s"]
                    for on, off in zip(runs[True], runs[False], strict=True))
    ratio = statistics.median(ratios)
    on_rate = statistics.median(r["rows_per_s"] for r in runs[True])
    off_rate = statistics.median(r["rows_per_s"] for r in runs[False])
    what = (f"over {args.prompts} system prompts" if args.dataset == "system"
            else f"over {args.rows // args.questions} documents, {args.questions} questions each")
    seqs = args.max_num_seqs or "vLLM's default"
    print(f"{args.rows} rows {what} of {args.prefix_tokens} tokens, random order, KV cache "
          f"{args.kv_mib} MiB, max_num_seqs {seqs}, max_tokens {args.max_tokens}, "
          f"{args.repeats} rounds")
    verdict = ("met in every round" if ratios[0] >= TARGET
               else "met in the median" if ratio >= TARGET else "NOT met")
    print(f"prefix order on/off:  {ratio:.2f}x median, rounds "
          f"{', '.join(f'{r:.2f}' for r in ratios)}  (target >= {TARGET}x: {verdict})")
    print(f"hetbatch on / bare vLLM:  {on_rate / bare['rows_per_s']:.2f}x")
    print(f"hetbatch off / bare vLLM: {off_rate / bare['rows_per_s']:.2f}x")


if __name__ == "__main__":
    main()
