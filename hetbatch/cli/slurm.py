"""`hetbatch submit`, `cancel` and the hidden `coordinate`: a job on Slurm."""

from __future__ import annotations

import logging
import sys

import click

from hetbatch.cli import options


@options.command("submit")
@options.job_file()
@click.option("--dry-run", is_flag=True, help="Print the sbatch scripts; submit nothing.")
@click.option(
    "--hetjob", is_flag=True, help="One heterogeneous job (coordinator and every pool together)."
)
@options.overwrite
@options.calibration
def submit_command(
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


@options.command("cancel")
@options.output_folder
def cancel_command(output: str) -> None:
    """Cancel the Slurm jobs submitted for OUTPUT; committed rows stay for a resubmit."""
    from hetbatch.launch.slurm.submit import cancel

    ids = cancel(output)
    click.echo(f"cancelled Slurm jobs {', '.join(ids)}" if ids else "no job queued or running")


@options.command("coordinate", hidden=True)
@options.output_folder
def coordinate_command(output: str) -> None:
    """Run the coordinator of a submitted job until every row is committed."""
    from hetbatch.launch.slurm.coordinate import coordinate

    logging.getLogger().setLevel(logging.INFO)
    sys.exit(coordinate(output))
