"""The `hetbatch` command line: one click group, one module per command family.

A user's mistake prints `hetbatch: <message>` on stderr and exits 2, never a traceback
(`options.Command`); options that several commands take are defined once in `options`.
"""

from __future__ import annotations

import logging

import click

from hetbatch import __version__
from hetbatch.cli.plan import plan_command
from hetbatch.cli.profile import profile_command
from hetbatch.cli.report import report_command
from hetbatch.cli.run import run_command
from hetbatch.cli.simulate import simulate_command
from hetbatch.cli.slurm import cancel_command, coordinate_command, submit_command
from hetbatch.cli.status import status_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hetbatch")
def main() -> None:
    """Offline LLM batch inference over Parquet, on every accelerator you have."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


for _command in (run_command, plan_command, profile_command, simulate_command, submit_command,
                 status_command, cancel_command, coordinate_command, report_command):
    main.add_command(_command)
