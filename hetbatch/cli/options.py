"""What every `hetbatch` command shares: the way it reports a user's mistake, and the
arguments and options that several commands take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from hetbatch.errors import UserError


class Command(click.Command):
    """A hetbatch command: a UserError prints `hetbatch: <message>` on stderr and exits 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"hetbatch: {exc}", err=True)
            ctx.exit(exc.exit_code)


def command(name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Command]:
    """`click.command` for a hetbatch command."""
    return click.command(name, cls=Command, **kwargs)  # type: ignore[return-value]


def job_file(required: bool = True) -> Callable[[Callable[..., Any]], Any]:
    return click.argument("job_file", required=required, type=click.Path(dir_okay=False))


output_folder = click.argument("output")

overwrite = click.option(
    "--overwrite", is_flag=True, help="Discard an earlier run's output and start over."
)

calibration = click.option(
    "--calibration",
    type=click.Path(dir_okay=False, exists=True),
    help="Calibration file from `hetbatch profile`: the planner's speeds for this hardware.",
)

as_json = click.option("--json", "as_json", is_flag=True, help="Print JSON (machine-readable).")
