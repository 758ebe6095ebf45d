"""A sample of a job's input, read once: a few evenly spaced chunks of consecutive rows.

Everything that looks at a sample before a run looks at this one: the planner's prompt lengths,
prefix order's `auto` detection, and the simulator's shared-prefix groups. Only the columns a
row's prompt is made from are read, and only the row groups the chunks fall in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hetbatch.io.parquet import open_dataset, read_rows
from hetbatch.spec import JobSpec, template_fields

SAMPLE_ROWS = 2000
SAMPLE_CHUNKS = 4


def prompt_columns(job: JobSpec) -> list[str]:
    """The input columns a row's prompt is made from."""
    if job.input.format == "openai-batch":
        return ["request"]
    if job.input.messages_column:
        return [job.input.messages_column]
    cols = [str(job.input.prompt_column), *template_fields(job.prompt_template or "")]
    return list(dict.fromkeys(cols))


@dataclass(frozen=True)
class InputSample:
    """Chunks of consecutive input rows (their prompt columns) and the input's row count."""

    chunks: tuple[tuple[dict[str, Any], ...], ...]
    total_rows: int

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [row for chunk in self.chunks for row in chunk]


def read_sample(
    job: JobSpec, dataset: Any = None, sample_rows: int = SAMPLE_ROWS
) -> InputSample:
    """Up to `sample_rows` rows in SAMPLE_CHUNKS evenly spaced chunks of consecutive rows
    (`dataset`: the job's input already opened, else it is opened here)."""
    columns = prompt_columns(job)
    if dataset is None:
        dataset = open_dataset(job.input.path, columns, job.input.storage_options,
                               input_format=job.input.format)
    total = dataset.num_rows
    want = max(1, min(sample_rows, total))
    chunks = min(SAMPLE_CHUNKS, want)
    size = want // chunks
    out = []
    for k in range(chunks):
        start = (total - size) * k // max(1, chunks - 1) if chunks > 1 else 0
        out.append(tuple(read_rows(dataset, start, start + size, columns).to_pylist()))
    return InputSample(tuple(out), total)
