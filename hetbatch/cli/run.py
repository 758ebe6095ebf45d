"""`hetbatch run JOB_FILE`: the whole job on this machine."""

from __future__ import annotations

import sys

import click

from hetbatch.cli import options


@options.command("run")
@options.job_file()
@options.overwrite
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@options.calibration
def run_command(job_file: str, overwrite: bool, no_progress: bool, calibration: str | None) -> None:
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
