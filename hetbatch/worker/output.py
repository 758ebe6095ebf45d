"""Rows out: the output shard of a unit, built from its input rows and their completions."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from hetbatch.spec import JobSpec

OUTPUT_FIELDS = [
    pa.field("generated_text", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("completion_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("error", pa.string()),
    pa.field("instance", pa.string()),
]


def output_schema(job: JobSpec, input_schema: pa.Schema) -> pa.Schema:
    key = job.input.id_column
    fields = [input_schema.field(key) if key else pa.field("row_id", pa.int64())]
    fields += [input_schema.field(c) for c in job.input.keep_columns if c != key]
    return pa.schema(fields + OUTPUT_FIELDS)


def build_output(
    job: JobSpec,
    schema: pa.Schema,
    table: pa.Table,
    first_row: int,
    results: list[dict[str, Any]],
    instance: str,
) -> pa.Table:
    """The output shard of one unit: id or row_id, kept columns, then the completion fields."""
    n = len(results)
    key = job.input.id_column
    columns: dict[str, Any] = {}
    if key:
        columns[key] = table.column(key)
    else:
        columns["row_id"] = pa.array(range(first_row, first_row + n), pa.int64())
    for c in job.input.keep_columns:
        if c != key:
            columns[c] = table.column(c)
    for f in OUTPUT_FIELDS:
        if f.name == "instance":
            columns[f.name] = pa.array([instance] * n, f.type)
        else:
            columns[f.name] = pa.array([r.get(f.name) for r in results], f.type)
    return pa.Table.from_pydict(columns, schema=schema)
