"""What a job did, for people: the summary `run` prints at the end, and `hetbatch report`'s
self-contained HTML page (and PNG charts) of a real or simulated run."""

from hetbatch.report.summary import summary_lines

__all__ = ["summary_lines"]
