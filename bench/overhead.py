"""hetbatch's own overhead: one instance under `hetbatch run` against one bare vLLM call.

Both sides run the same prompts (chat template applied, the same per-row seeds) with the same
engine arguments on one pinned core, alternating, in fresh processes. Printed ratios are
hetbatch over bare (1.0 = no overhead):
  - end to end: rows / wall time of the whole process (imports, engine start-up, writing);
  - steady state: output tokens/s from engine ready to the last result (prompts rendered with
    the chat template on both sides; hetbatch also reads Parquet and writes its shards).

    python bench/overhead.py [--rows 5000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "demo.yaml"
ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}

BARE = r'''
import json, sys, time
t0 = time.monotonic()
import polars as pl
from vllm import LLM, SamplingParams
from hetbatch.spec import load_job
from hetbatch.prompts import row_seed
job = load_job(sys.argv[1])
rows = pl.read_parquet(job.input.path).head(int(sys.argv[2]))
args = {**job.model.engine_args, "enable_chunked_prefill": False}
llm = LLM(job.model.path, **args)
t1 = time.monotonic()  # engine ready: from here on both sides do the same work
tok = llm.get_tokenizer()
prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in rows["prompt"]]
params = [SamplingParams(**job.sampling, seed=row_seed(job.seed, k)) for k in rows["id"]]
outs = llm.generate(prompts, params, use_tqdm=False)
t2 = time.monotonic()
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
print(json.dumps({"rows": len(outs), "tokens": tokens, "gen_s": t2 - t1, "wall_s": t2 - t0}))
'''


def bench_job(tmp: Path, rows: int) -> Path:
    job = yaml.safe_load(DEMO.read_text())
    job["model"]["path"] = str(ROOT / job["model"]["path"])
    src = tmp / "prompts.parquet"
    import polars as pl

    pl.read_parquet(ROOT / job["input"]["path"]).head(rows).write_parquet(src)
    job["input"]["path"] = str(src)
    job["output"]["path"] = str(tmp / "out")
    job["cluster"]["pools"][0]["devices_per_node"] = 1
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_bare(job: Path, rows: int) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", BARE, str(job), str(rows)], env=ENV, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = time.monotonic() - t0
    result["tokens_per_s"] = result["tokens"] / result["gen_s"]
    return result


def run_hetbatch(job: Path) -> dict:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "hetbatch", "run", str(job), "--overwrite"], env=ENV,
                   check=True, capture_output=True)
    wall = time.monotonic() - t0
    metrics = json.loads((job.parent / "out" / "_hetbatch" / "metrics.json").read_text())
    (inst,) = metrics["instances"].values()
    gen_s = inst["last_commit_s"] - inst["first_lease_s"]
    return {"rows": inst["rows"], "tokens": inst["completion_tokens"], "wall_s": wall,
            "tokens_per_s": inst["completion_tokens"] / gen_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = bench_job(Path(tmp), args.rows)
        bare, het = [], []
        for i in range(args.repeats):
            bare.append(run_bare(job, args.rows))
            het.append(run_hetbatch(job))
            print(f"round {i + 1}: bare {bare[-1]['wall_s']:.1f} s "
                  f"({bare[-1]['tokens_per_s']:,.0f} tok/s), hetbatch {het[-1]['wall_s']:.1f} s "
                  f"({het[-1]['tokens_per_s']:,.0f} tok/s)", flush=True)
    assert all(h["rows"] == args.rows for h in het)
    e2e = statistics.median(b["wall_s"] / h["wall_s"] for b, h in zip(bare, het, strict=True))
    steady = statistics.median(
        h["tokens_per_s"] / b["tokens_per_s"] for b, h in zip(bare, het, strict=True))
    print(f"rows {args.rows}, one instance on one core, median of {args.repeats} rounds")
    print(f"throughput ratio hetbatch/bare, end to end:  {e2e:.3f}")
    print(f"throughput ratio hetbatch/bare, steady state: {steady:.3f}")


if __name__ == "__main__":
    main()
