"""Errors that are the user's to fix: the CLI prints them as one line and exits 2."""


class UserError(Exception):
    """A mistake in the job file, the input or the command line; never shown as a traceback."""

    exit_code = 2
