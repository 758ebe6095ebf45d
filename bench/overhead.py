"""hetbatch against bare vLLM as its users run it, on a short job and a long one.

Every side runs the same prompts (the demo's, repeated for the long job; chat template applied),
greedy, `--max-tokens` tokens each, with the same engine arguments, on the same cores, each in
fresh processes. Sides:
  - vllm:      `LLM.generate` in vLLM's default mode (engine core in its own process, vLLM's
               own CPU binding); two instances are two processes given half the rows each,
               pinned to core 0 and core 1 (vLLM's "auto" binding puts both on core 0);
  - vllm-best: the fastest bare configuration found on these cores (`BEST`);
  - hetbatch:  `hetbatch run` with the job's defaults (hetbatch-mp, hetbatch-inproc: with the
               engine core in its own process, or in the worker's, forced).
Rounds alternate the sides' order (the machine is noisy; compare within a round). Printed per
job, instance count and side, as the median over rounds with the spread (min-max):
  - generation phase: output tokens/s from engine ready to the last result, summed over
    instances (bare: around `generate`, which includes templating and tokenizing; hetbatch:
    first lease to last commit, which includes reading Parquet and writing shards);
  - whole process: wall time of everything (imports, engine start-up, work, shutdown).
Ratios are hetbatch over each bare side: rate (>= 1: hetbatch faster) and time (<= 1: faster).

    python bench/overhead.py                     # the full run (25 to 45 min)
    python bench/overhead.py --quick             # 2,000 and 10,000 rows, one round (minutes)
    python bench/overhead.py --jobs short --instances 1 --sides vllm,hetbatch --rounds 2
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

# What vLLM's documentation has a user set on a CPU-only machine, nothing more: every side
# starts from this, without hetbatch's or vLLM's tuning variables of the calling shell.
_CLEAN = {k: v for k, v in os.environ.items()
          if not k.startswith(("VLLM_", "OMP_", "HETBATCH_", "CUDA_"))}
BASE_ENV = {**_CLEAN, "HF_HUB_OFFLINE": "1"}

# vLLM's default mode: nothing set on one instance; two are pinned apart (see above).
DEFAULT: dict[int, list[dict[str, str]]] = {
    1: [{}],
    2: [{"VLLM_CPU_OMP_THREADS_BIND": str(k)} for k in range(2)],
}
# The fastest bare-vLLM settings found on this 2-core machine, per instance count (environment
# per instance). One instance: the default (its engine core on core 0, its front end on core
# 1); in-process with one OpenMP thread was a quarter slower. Two instances: engines
# in-process, one OpenMP thread each, pinned apart. A side equal to the default is not rerun.
BEST: dict[int, list[dict[str, str]]] = {
    1: DEFAULT[1],
    2: [{"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1",
         "VLLM_CPU_OMP_THREADS_BIND": str(k)} for k in range(2)],
}

BARE = r'''
import json, sys, time
import polars as pl
from vllm import LLM, SamplingParams
from hetbatch.engines.factory import vllm_args
from hetbatch.layout import instance_layout
from hetbatch.spec import load_job
if __name__ == "__main__":
    job = load_job(sys.argv[1])
    start, end = int(sys.argv[2]), int(sys.argv[3])
    rows = pl.read_parquet(job.input.path).slice(start, end - start)
    # The engine arguments exactly as hetbatch passes them to vLLM.
    args = vllm_args(job, instance_layout(job, None)[0].__dict__)
    llm = LLM(job.model.path, **args)
    ready = time.time()
    tok = llm.get_tokenizer()
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in rows["prompt"]]
    outs = llm.generate(prompts, SamplingParams(**job.sampling), use_tqdm=False)
    done = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    # vLLM logs to stdout too: the result is the line marked as such.
    print("RESULT", json.dumps({"rows": len(outs), "tokens": tokens, "ready": ready,
                                "done": done}), flush=True)
'''


def make_job(tmp: Path, name: str, rows: int, instances: int, max_tokens: int) -> Path:
    """The demo job on `rows` rows (the demo's prompts repeated, fresh ids), greedy."""
    import polars as pl

    job = yaml.safe_load(DEMO.read_text())
    job["model"]["path"] = str(ROOT / job["model"]["path"])
    demo = pl.read_parquet(ROOT / job["input"]["path"])
    table = pl.concat([demo] * -(-rows // demo.height)).head(rows)
    table = table.with_columns(pl.int_range(rows, dtype=pl.Int64).alias("id"))
    src = tmp / f"{name}.parquet"
    table.write_parquet(src, row_group_size=1000)
    job["input"]["path"] = str(src)
    job["output"]["path"] = str(tmp / f"out-{name}-{instances}")
    job["sampling"] = {"max_tokens": max_tokens, "temperature": 0.0}
    job["cluster"]["pools"][0]["devices_per_node"] = instances
    path = tmp / f"job-{name}-{instances}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# hetbatch's sides: its default, or one engine mode forced (to see what the default chose from).
HETBATCH_MODES = {"hetbatch": None, "hetbatch-mp": True, "hetbatch-inproc": False}


def start_bare(job: Path, rows: int, envs: list[dict[str, str]]) -> list[subprocess.Popen]:
    """One process per instance, each given its share of the rows, all started at once."""
    bounds = [rows * k // len(envs) for k in range(len(envs) + 1)]
    return [
        subprocess.Popen([sys.executable, "-c", BARE, str(job), str(a), str(b)],
                         env={**BASE_ENV, **env}, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
        for env, a, b in zip(envs, bounds, bounds[1:], strict=False)
    ]


def run_bare(job: Path, rows: int, envs: list[dict[str, str]]) -> dict:
    t0 = time.time()
    procs = start_bare(job, rows, envs)
    outs = [p.communicate()[0] for p in procs]
    wall = time.time() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"bare vLLM failed: exit codes {[p.returncode for p in procs]}")
    results = [json.loads(next(line.removeprefix("RESULT ") for line in o.splitlines()
                               if line.startswith("RESULT "))) for o in outs]
    return {
        "rows": sum(r["rows"] for r in results),
        "tokens": sum(r["tokens"] for r in results),
        "rate": sum(r["tokens"] / (r["done"] - r["ready"]) for r in results),
        "wall_s": wall,
    }


def run_hetbatch(job: Path, multiprocessing: bool | None = None) -> dict:
    """`multiprocessing` None: the job's default engine mode; else that mode forced."""
    if multiprocessing is not None:
        spec = yaml.safe_load(job.read_text())
        spec.setdefault("engine", {})["multiprocessing"] = multiprocessing
        job = job.with_name(f"{job.stem}-mp{int(multiprocessing)}.yaml")
        job.write_text(yaml.safe_dump(spec))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "hetbatch", "run", str(job), "--overwrite"],
                   env=BASE_ENV, check=True, capture_output=True)
    wall = time.time() - t0
    out = Path(yaml.safe_load(job.read_text())["output"]["path"])
    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    insts = metrics["instances"].values()
    return {
        "rows": sum(i["rows"] for i in insts),
        "tokens": sum(i["completion_tokens"] for i in insts),
        "rate": sum(i["completion_tokens"] / (i["last_commit_s"] - i["first_lease_s"])
                    for i in insts),
        "wall_s": wall,
    }


def run_side(side: str, job: Path, rows: int, instances: int) -> dict:
    if side.startswith("hetbatch"):
        return run_hetbatch(job, HETBATCH_MODES[side])
    return run_bare(job, rows, (DEFAULT if side == "vllm" else BEST)[instances])


def spread(values: list[float], fmt: str) -> str:
    """Median and, over several rounds, the range."""
    mid = format(statistics.median(values), fmt)
    if len(values) == 1:
        return mid
    return f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def measure(job: Path, rows: int, instances: int, sides: list[str], rounds: int,
            label: str) -> dict[str, list[dict]]:
    if "vllm" in sides and BEST[instances] == DEFAULT[instances]:
        sides = [s for s in sides if s != "vllm-best"]  # the same runs again
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(rounds):
        order = sides if r % 2 == 0 else sides[::-1]
        for side in order:
            res = run_side(side, job, rows, instances)
            if res["rows"] != rows:
                raise RuntimeError(f"{side}: {res['rows']} rows of {rows}")
            results[side].append(res)
            print(f"  {label} round {r + 1} {side:<15} {res['rate']:>8,.0f} tok/s "
                  f"{res['wall_s']:>6.1f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
    return results


def report(label: str, results: dict[str, list[dict]]) -> list[str]:
    lines = [f"{label}:",
             f"  {'side':<16} {'generation tok/s':>26} {'whole process s':>24}"]
    for side, res in results.items():
        lines.append(f"  {side:<16} {spread([r['rate'] for r in res], ',.0f'):>26} "
                     f"{spread([r['wall_s'] for r in res], '.1f'):>24}")
    for mine in [s for s in results if s.startswith("hetbatch")]:
        for side in [s for s in results if not s.startswith("hetbatch")]:
            pairs = list(zip(results[mine], results[side], strict=True))
            rate = spread([h["rate"] / b["rate"] for h, b in pairs], ".3f")
            wall = spread([h["wall_s"] / b["wall_s"] for h, b in pairs], ".3f")
            lines.append(f"  {mine} / {side}: generation rate {rate}, whole-process time {wall}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="2,000 and 10,000 rows, one round (unless set otherwise)")
    parser.add_argument("--jobs", default="short,long", help="short, long or both")
    parser.add_argument("--instances", default="1,2", help="instance counts to measure")
    parser.add_argument("--sides", default="vllm,vllm-best,hetbatch")
    parser.add_argument("--short-rows", type=int)
    parser.add_argument("--long-rows", type=int)
    parser.add_argument("--rounds", type=int, help="rounds of every job")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = {"short": args.short_rows or (2000 if args.quick else 5000),
            "long": args.long_rows or (10000 if args.quick else 50000)}
    # Two rounds of each: the full run takes 25 to 45 minutes on two cores (tiny-model rates
    # of 10,000 down to 5,000 tokens/s per instance were seen on the same machine).
    rounds = {"short": args.rounds or (1 if args.quick else 2),
              "long": args.rounds or (1 if args.quick else 2)}
    sides = args.sides.split(",")
    unknown = set(sides) - {"vllm", "vllm-best", *HETBATCH_MODES}
    if unknown:
        parser.error(f"unknown sides {sorted(unknown)}")
    lines: list[str] = []
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.jobs.split(","):
            for n in [int(k) for k in args.instances.split(",")]:
                job = make_job(Path(tmp), name, rows[name], n, args.max_tokens)
                label = f"{name} job, {rows[name]:,} rows, {n} instance(s)"
                block = report(label, measure(job, rows[name], n, sides, rounds[name], label))
                print("\n".join(block), flush=True)
                lines += block
    print(f"\nmedian (min-max) of rounds; {time.time() - started:.0f} s in all")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
