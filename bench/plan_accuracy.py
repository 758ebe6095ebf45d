"""How close the calibrated plan comes to a real run of the demo job.

Profiles the demo job (writes jobs/demo.calibration.json), plans it with that calibration, runs
it, and compares the planned output tokens/s of the cluster with the measured one: the sum over
instances of completion tokens / (last commit - first lease). Run from the repository root:

    python bench/plan_accuracy.py [--job jobs/demo.yaml] [--skip-profile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from hetbatch.planning import load_calibration, plan_job
from hetbatch.profiling.harness import default_out
from hetbatch.spec import load_job

TARGET = 0.25


def profile(job: str) -> Path:
    subprocess.run([sys.executable, "-m", "hetbatch", "profile", job, "--fresh"],
                   check=True)
    return default_out(job)


def run(job: str) -> dict:
    subprocess.run([sys.executable, "-m", "hetbatch", "run", job, "--overwrite"], check=True)
    out = Path(load_job(job).output.path)
    return json.loads((out / "_hetbatch" / "metrics.json").read_text())


def measured_rate(metrics: dict) -> float:
    """Output tokens/s of the cluster while its instances were working."""
    rate = 0.0
    for inst in metrics["instances"].values():
        window = inst["last_commit_s"] - inst["first_lease_s"]
        rate += inst["completion_tokens"] / window if window > 0 else 0.0
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--skip-profile", action="store_true",
                        help="Use the existing calibration file.")
    args = parser.parse_args()
    cal_path = default_out(args.job) if args.skip_profile else profile(args.job)
    job = load_job(args.job)
    default = plan_job(job).output_tokens_per_s
    planned = plan_job(job, calibration=load_calibration(cal_path)).output_tokens_per_s
    metrics = run(args.job)
    measured = measured_rate(metrics)
    ratio = planned / measured
    print(f"uncalibrated plan:  {default:10,.0f} output tok/s  (ratio {default / measured:.2f})")
    print(f"calibrated plan:    {planned:10,.0f} output tok/s")
    print(f"measured run:       {measured:10,.0f} output tok/s  "
          f"({len(metrics['instances'])} instances, wall {metrics['wall_s']:.1f} s)")
    verdict = "within" if abs(ratio - 1) <= TARGET else "outside"
    print(f"planned / measured: {ratio:.2f}  ({verdict} the {TARGET:.0%} target)")


if __name__ == "__main__":
    main()
