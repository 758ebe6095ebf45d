"""The simulator against real runs: predicted makespan over measured, for two clusters.

1. The demo job (jobs/demo.yaml: real vLLM on the CPU, two instances, the tiny model), simulated
   with speeds from its plan under the `cpu` calibration (jobs/demo.calibration.json; profiled
   first if missing) and the job's own input, every row generating max_tokens (a random-weight
   model rarely stops early).
2. A two-speed mix of simulated engines (one instance at 40,000 and one at 10,000 output
   tokens/s), run for real by `hetbatch run` and simulated with the same pool settings.

The measured makespan is the processing window, the last commit minus the first lease over all
instances, from OUT/_hetbatch/metrics.json. Engine start-up (loading vLLM and the model) comes
before the first lease and is not part of what the simulator models. Run from the repository
root:

    python bench/sim_vs_real.py [--rows 25000] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from hetbatch.cli.simulate import build_instances, predict
from hetbatch.profiling.harness import default_out
from hetbatch.spec import JobSpec, load_job

DEMO = "jobs/demo.yaml"
TARGET = 0.2


def run(job_file: str) -> dict:
    """Run the job for real; its metrics. The load average is printed first: the machine has
    two cores, and anything else running on them slows the real run but not the prediction."""
    print(f"running {job_file} (load average {os.getloadavg()[0]:.2f})", flush=True)
    subprocess.run([sys.executable, "-m", "hetbatch", "run", job_file, "--overwrite"],
                   check=True, stdout=subprocess.DEVNULL)
    out = Path(load_job(job_file).output.path)
    return json.loads((out / "_hetbatch" / "metrics.json").read_text())


def window(metrics: dict) -> float:
    """Seconds from the first lease to the last commit: the part a simulation models."""
    insts = metrics["instances"].values()
    return max(i["last_commit_s"] for i in insts) - min(i["first_lease_s"] for i in insts)


def demo() -> tuple[float, float, dict, str]:
    cal = str(default_out(DEMO))
    if not Path(cal).exists():
        subprocess.run([sys.executable, "-m", "hetbatch", "profile", DEMO], check=True)
    job = load_job(DEMO)
    max_tokens = float(job.sampling["max_tokens"])
    predicted = predict(job, calibration=cal, output_len=max_tokens, output_sigma=0.0)
    metrics = run(DEMO)
    measured = window(metrics)
    again = replay(job, cal, metrics)
    note = (f"  given the run's measured speeds and output lengths instead: {again:.2f} s "
            f"(ratio {again / measured:.2f})")
    return predicted.makespan, measured, metrics, note


def replay(job: JobSpec, cal: str, metrics: dict) -> float:
    """The demo simulated again with what the run measured: each instance's output tokens/s
    over its window and the mean completion length. It separates the simulator's model of
    scheduling and batching from the calibrated plan's speed estimate."""
    insts = metrics["instances"]
    rows = sum(v["rows"] for v in insts.values())
    mean_out = sum(v["completion_tokens"] for v in insts.values()) / rows
    planned = {i.instance_id: i.speed for i in build_instances(job, calibration=cal)}
    slow = tuple(
        f"{k}={v['completion_tokens'] / (v['last_commit_s'] - v['first_lease_s']) / planned[k]}"
        for k, v in insts.items()
    )
    return predict(job, calibration=cal, output_len=mean_out, output_sigma=0.0,
                   slow=slow).makespan


def write_mix(tmp: Path, rows: int) -> str:
    """A job of simulated engines at two speeds over a `rows`-row input."""
    prompts = [" ".join(["word"] * (1 + i % 20)) + f" {i}" for i in range(rows)]
    table = pa.table({"id": [f"r{i:06d}" for i in range(rows)], "prompt": prompts})
    pq.write_table(table, tmp / "in.parquet", row_group_size=500)
    pools = [
        {"name": name, "accelerator": "cpu", "devices_per_node": 1,
         "sim": {"tokens_per_s": speed, "max_num_seqs": 64}}
        for name, speed in (("fast", 40_000.0), ("slow", 10_000.0))
    ]
    job = {
        "model": {"path": "simulated"},
        "input": {"path": str(tmp / "in.parquet"), "prompt_column": "prompt", "id_column": "id"},
        "output": {"path": str(tmp / "out")},
        "sampling": {"max_tokens": 8},
        "engine": {"kind": "sim"},
        "scheduler": {"max_unit_rows": 256, "heartbeat_s": 0.3},
        "cluster": {"pools": pools},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return str(path)


def mix(rows: int) -> tuple[float, float, dict, str]:
    with tempfile.TemporaryDirectory() as d:
        job_file = write_mix(Path(d), rows)
        job: JobSpec = load_job(job_file)
        predicted = predict(job)
        metrics = run(job_file)
    return predicted.makespan, window(metrics), metrics, ""


def report(name: str, predicted: float, measured: float, metrics: dict, note: str) -> None:
    ratio = predicted / measured
    verdict = "within" if abs(ratio - 1) <= TARGET else "outside"
    print(f"{name}")
    print(f"  predicted makespan {predicted:7.2f} s")
    wall = metrics["wall_s"]
    print(f"  measured window    {measured:7.2f} s   (wall {wall:.1f} s incl. start-up)")
    for k, v in metrics["instances"].items():
        span = v["last_commit_s"] - v["first_lease_s"]
        print(f"    {k:10s} {v['rows']:7,d} rows {v['completion_tokens']:9,d} tokens "
              f"{v['completion_tokens'] / span:9,.0f} tok/s over {span:.2f} s")
    print(f"  predicted / measured: {ratio:.2f}  ({verdict} the {TARGET:.0%} target)")
    if note:
        print(note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25_000, help="Rows of the simulated mix.")
    parser.add_argument("--skip-demo", action="store_true", help="Only the simulated mix.")
    args = parser.parse_args()
    if not args.skip_demo:
        report("demo (vLLM, cpu x2, calibrated plan)", *demo())
    report(f"mix (sim engines, 40k + 10k tok/s, {args.rows:,} rows)", *mix(args.rows))


if __name__ == "__main__":
    main()
