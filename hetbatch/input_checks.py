"""Checks of the input against the job, made from what reading the footers already gives:
the prompt column holds text, the id column holds scalars and no nulls.

Null ids are found in the row groups' statistics (no rows read), and only the row group that
holds one is read, to name the row. Files written without statistics are checked by the workers
as they read their units (see `unit_id_problems`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from hetbatch.errors import UserError

if TYPE_CHECKING:
    from hetbatch.spec import JobSpec


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_scalar_key(t: pa.DataType) -> bool:
    return _is_text(t) or pa.types.is_integer(t) or pa.types.is_binary(t)


@dataclass
class IdStatistics:
    """Collects, per input file, the row groups whose statistics count null ids."""

    column: str
    null_groups: list[tuple[str, int, int]] = field(default_factory=list)  # path, group, nulls
    unknown_files: int = 0

    def __call__(self, shown: str, meta: pq.FileMetaData) -> None:
        index = meta.schema.to_arrow_schema().get_field_index(self.column)
        if index < 0:
            return  # a missing column is reported by open_dataset itself
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            if stats is None or not stats.has_null_count:
                self.unknown_files += 1
                return
            if stats.null_count:
                self.null_groups.append((shown, g, stats.null_count))


def check_columns(job: JobSpec, schema: pa.Schema) -> None:
    """The prompt column is text (unless the job casts), the id column a scalar key."""
    prompt = job.input.prompt_column
    if prompt and prompt in schema.names and not job.input.cast_prompt:
        kind = schema.field(prompt).type
        if not _is_text(kind):
            raise UserError(
                f"{job.input.path}: prompt column {prompt!r} is {kind}, not text; set "
                "input.cast_prompt: true to convert its values to text"
            )
    key = job.input.id_column
    if key and key in schema.names and not _is_scalar_key(schema.field(key).type):
        raise UserError(
            f"{job.input.path}: id column {key!r} is {schema.field(key).type}; ids must be "
            "text or integers"
        )


def id_statistics(job: JobSpec) -> IdStatistics | None:
    """The collector to hand `open_dataset`, when the job has ids that must be a key."""
    key = job.input.id_column
    return IdStatistics(key) if key and job.input.id_is_key else None


def check_input(job: JobSpec, schema: pa.Schema, stats: IdStatistics | None) -> None:
    """Everything about the input the footers tell; raises UserError."""
    check_columns(job, schema)
    if stats is not None:
        check_null_ids(stats)


def check_null_ids(stats: IdStatistics) -> None:
    """Refuse null ids found by the footers' statistics, naming the file and the row."""
    if not stats.null_groups:
        return
    shown, group, _ = stats.null_groups[0]
    total = sum(n for _, _, n in stats.null_groups)
    row = _first_null_row(shown, group, stats.column)
    more = f" ({total:,} null ids in all)" if total > 1 else ""
    raise UserError(
        f"{shown}: row {row}: id column {stats.column!r} is null{more}; ids must be a key "
        "(or set input.id_is_key: false)"
    )


def _first_null_row(path: str, group: int, column: str) -> int:
    """Row number within the file of the first null in one row group (reads that group only)."""
    fs, local = url_to_fs(path)
    with fs.open(local, "rb") as fh:
        pf = pq.ParquetFile(fh)
        before = sum(pf.metadata.row_group(g).num_rows for g in range(group))
        values = pf.read_row_group(group, columns=[column]).column(0)
    nulls = values.is_null().to_pylist()
    return before + nulls.index(True)


def unit_id_problems(keys: Sequence[Any]) -> tuple[int, int]:
    """(null ids, duplicated ids) among one unit's ids: what a worker's read already gives."""
    nulls = sum(k is None for k in keys)
    counts = Counter(k for k in keys if k is not None)
    return nulls, sum(c - 1 for c in counts.values() if c > 1)
