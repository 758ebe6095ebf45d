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
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def status(output: str, as_json: bool) -> None:
    """Progress of the job writing to OUTPUT, from its ledger."""
    from hetbatch.status import job_status

    info = job_status(output)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(
        f"{info['state']}: {info['rows_done']:,} of {info['rows_total']:,} rows "
        f"({info['percent']:.1f}%) in {info['shards']} shards"
    )
    for name, m in sorted(info["instances"].items()):
        click.echo(f"  {name:<16} {m['rows']:>9,} rows {m['completion_tokens']:>11,} tokens")


def _register_subsystem_commands() -> None:
    """Commands that live beside their subsystem (planner, simulator, launchers)."""
    from hetbatch.planner.cli import plan_command
    from hetbatch.planner.profile_cli import profile_command
    from hetbatch.sim.cli import simulate_command

    main.add_command(plan_command, "plan")
    main.add_command(profile_command, "profile")
    main.add_command(simulate_command, "simulate")


_register_subsystem_commands()
