"""The `hetbatch` command line. User mistakes print one line and exit 2; never a traceback."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from hetbatch import __version__
from hetbatch.errors import UserError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a UserError into `hetbatch: <message>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            click.echo(f"hetbatch: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hetbatch")
def main() -> None:
    """Offline LLM batch inference over Parquet, on every accelerator you have."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Discard an earlier run's output and start over.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, exists=True),
    help="Calibration file from `hetbatch profile`, for pools the planner sizes.",
)
@user_errors
def run(job_file: str, overwrite: bool, no_progress: bool, calibration: str | None) -> None:
    """Run JOB_FILE on this machine; rerun the same command to resume."""
    from hetbatch.launch.local import JobFailed, LocalLauncher
    from hetbatch.spec import load_job

    launcher = LocalLauncher(load_job(job_file), overwrite=overwrite, calibration=calibration)
    try:
        code = launcher.run(progress=not no_progress and sys.stderr.isatty())
    except JobFailed as exc:
        click.echo(f"hetbatch: job failed: {exc}", err=True)
        code = 1
    sys.exit(code)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts; submit nothing.")
@click.option(
    "--hetjob", is_flag=True, help="One heterogeneous job (coordinator and every pool together)."
)
@click.option("--overwrite", is_flag=True, help="Discard an earlier run's output and start over.")
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, exists=True),
    help="Calibration file from `hetbatch profile`, for pools the planner sizes.",
)
@user_errors
def submit(
    job_file: str, dry_run: bool, hetjob: bool, overwrite: bool, calibration: str | None
) -> None:
    """Submit JOB_FILE to Slurm: a coordinator job and one job per pool.

    Submitting again submits only what is no longer queued or running (e.g. a coordinator
    that was killed); the job resumes from its ledger.
    """
    from hetbatch.launch.slurm.submit import SlurmLauncher
    from hetbatch.spec import load_job

    launcher = SlurmLauncher(load_job(job_file), overwrite=overwrite, calibration=calibration)
    sys.exit(launcher.submit(dry_run=dry_run, hetjob=hetjob))


@main.command()
@click.argument("output")
@user_errors
def cancel(output: str) -> None:
    """Cancel the Slurm jobs submitted for OUTPUT; committed rows stay for a resubmit."""
    from hetbatch.launch.slurm.submit import cancel as cancel_jobs

    ids = cancel_jobs(output)
    click.echo(f"cancelled Slurm jobs {', '.join(ids)}" if ids else "no job queued or running")


@main.command(hidden=True)
@click.argument("output")
@user_errors
def coordinate(output: str) -> None:
    """Run the coordinator of a submitted job until every row is committed."""
    from hetbatch.launch.slurm.coordinate import coordinate as run_coordinator

    logging.getLogger().setLevel(logging.INFO)
    sys.exit(run_coordinator(output))


@main.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="A live view, refreshed until the job ends or Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes of --watch.")
@user_errors
def status(output: str, as_json: bool, watch: bool, interval: float) -> None:
    """Progress of the job writing to OUTPUT: ledger, live coordinator, Slurm jobs."""
    from hetbatch.status import job_status

    if watch:
        from hetbatch.watch import watch_status

        sys.exit(watch_status(output, interval))

    info = job_status(output)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in _status_lines(info):
        click.echo(line)


def _status_lines(info: dict[str, Any]) -> list[str]:
    live = info.get("live")
    eta = ""
    if live and live["eta_s"] is not None:
        eta = f", {live['rows_per_s']:,.0f} rows/s, ETA {_duration(live['eta_s'])}"
    lines = [
        f"{info['state']}: {info['rows_done']:,} of {info['rows_total']:,} rows "
        f"({info['percent']:.1f}%) in {info['shards']} shards{eta}"
    ]
    if live:
        lines.append(f"coordinator {live['coordinator']}, live:")
        for name, p in sorted(live["pools"].items()):
            lines.append(
                f"  pool {name:<11} {p['instances']:>3} instances "
                f"{p['output_tokens_per_s']:>11,.0f} out tok/s"
            )
        for name, m in live["instances"].items():
            lines.append(
                f"  {name:<16} {m['rows']:>9,} rows {m['output_tokens_per_s']:>11,.0f} out tok/s"
            )
    else:
        for name, m in sorted(info["instances"].items()):
            lines.append(
                f"  {name:<16} {m['rows']:>9,} rows {m['completion_tokens']:>11,} tokens"
            )
    for job in info.get("slurm", []):
        reason = f" ({job['reason']})" if job["reason"] and job["state"] == "PENDING" else ""
        lines.append(f"  slurm {job['id']:<10} {job['role']:<14} {job['state']}{reason}")
    return lines


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _register_subsystem_commands() -> None:
    """Commands that live beside their subsystem (planner, simulator, launchers)."""
    from hetbatch.planner.cli import plan_command
    from hetbatch.planner.profile_cli import profile_command
    from hetbatch.report.cli import report_command
    from hetbatch.sim.cli import simulate_command

    main.add_command(plan_command, "plan")
    main.add_command(profile_command, "profile")
    main.add_command(simulate_command, "simulate")
    main.add_command(report_command, "report")


_register_subsystem_commands()
