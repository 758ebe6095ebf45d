"""`hetbatch profile JOB_FILE`: time the real engine on this machine, write a calibration file."""

from __future__ import annotations

from pathlib import Path

import click

from hetbatch.cli import options
from hetbatch.errors import UserError
from hetbatch.planner.calibration import coefficients_or_default, measured_time
from hetbatch.planner.catalog import DEFAULT_CATALOG
from hetbatch.planner.model import default_coefficients
from hetbatch.planning import load_calibration, save_calibration
from hetbatch.profiling.harness import (
    RUN_ROWS,
    ProfileResult,
    default_out,
    predicted_time,
    profile_job,
)
from hetbatch.spec import JobSpec, load_job


def _report(result: ProfileResult, job: JobSpec) -> list[str]:
    lines = ["accelerator  conc  in_len  out_len  measured  default  fitted   (seconds)"]
    for m in result.measurements:
        acc = DEFAULT_CATALOG.get(m.accelerator)
        fitted = coefficients_or_default(acc, result.calibration)
        lines.append(
            f"{acc.name:<11}  {m.concurrency:>4}  {m.input_len:>6.0f}  {m.output_len:>7.0f}  "
            f"{measured_time(m):>8.3f}  {predicted_time(m, job, default_coefficients(acc)):>7.3f}"
            f"  {predicted_time(m, job, fitted):>6.3f}"
        )
    return lines


def _parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"--concurrency {text!r}: expected positive integers, e.g. 1,8,32")
    return values


@options.command("profile")
@options.job_file()
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Calibration file to write (default: JOB_FILE's name with .calibration.json).")
@click.option("--concurrency", default="",
              help="Sequences run at once, comma-separated (default: 1/8, 1/2 and all of the "
                   "job's max_num_seqs).")
@click.option("--pool", "pools", multiple=True, help="Profile only this pool (repeatable).")
@click.option("--fresh", is_flag=True, help="Replace the file rather than update it.")
@click.option("--run-rows", default=RUN_ROWS, show_default=True,
              help="Rows of the input in a short real run per pool (0: time the engine alone).")
def profile_command(
    job_file: str, out_path: str | None, concurrency: str, pools: tuple[str, ...], fresh: bool,
    run_rows: int,
) -> None:
    """Time the job's model on this machine's accelerator and write a calibration file for
    `hetbatch plan --calibration`. Run it on a node of each accelerator type."""
    out = Path(out_path) if out_path else default_out(job_file)
    base = load_calibration(out) if out.exists() and not fresh else None
    levels = _parse_ints(concurrency) if concurrency else ()
    result = profile_job(job_file, levels, pools, base, run_rows)
    save_calibration(result.calibration, out)
    click.echo("\n".join(_report(result, load_job(job_file))))
    click.echo(f"wrote {out}")
