"""Rows in, rows out: prompts built from input rows, output tables built from completions."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import pyarrow as pa

from hetbatch.engines.base import Completion, Sample, TopLogprob
from hetbatch.spec import JobSpec, json_schema, template_fields

TOP_LOGPROB = pa.struct(
    [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]
)
TOKEN_LOGPROBS = pa.list_(pa.float32())
TOP_LOGPROBS = pa.list_(pa.list_(TOP_LOGPROB))


# The column that holds a pooling task's vector.
VECTOR_COLUMNS = {"embed": "embedding", "classify": "class_scores"}


def output_fields(job: JobSpec) -> list[pa.Field]:
    """The completion columns of a job's output. With `sampling.n > 1` the per-sample columns
    are lists of n values (`completion_tokens` stays the row's total, the tokens paid for);
    log-probability columns appear only when asked for."""
    if job.task != "generate":
        return [
            pa.field(VECTOR_COLUMNS[job.task], pa.list_(pa.float32())),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("error", pa.string()),
            pa.field("instance", pa.string()),
        ]
    many = job.samples_per_row > 1

    def per_sample(kind: pa.DataType) -> pa.DataType:
        return pa.list_(kind) if many else kind

    fields = [
        pa.field("generated_text", per_sample(pa.string())),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", per_sample(pa.string())),
    ]
    if many:
        fields.append(pa.field("sample_completion_tokens", pa.list_(pa.int32())))
    if job.sampling.get("logprobs") is not None:
        fields.append(pa.field("token_logprobs", per_sample(TOKEN_LOGPROBS)))
        fields.append(pa.field("top_logprobs", per_sample(TOP_LOGPROBS)))
    if job.sampling.get("prompt_logprobs") is not None:
        fields.append(pa.field("prompt_logprobs", TOKEN_LOGPROBS))
        fields.append(pa.field("prompt_top_logprobs", TOP_LOGPROBS))
    if job.structured:
        fields.append(pa.field("structured_error", per_sample(pa.string())))
    return [*fields, pa.field("error", pa.string()), pa.field("instance", pa.string())]


def completion_values(job: JobSpec, c: Completion, prompt: RowPrompt) -> dict[str, Any]:
    """A finished request as the values of its row's output columns."""
    if job.task != "generate":
        return {VECTOR_COLUMNS[job.task]: c.vector, "prompt_tokens": c.prompt_tokens}
    samples = c.samples or (Sample(c.text, c.completion_tokens, c.finish_reason),)
    many = job.samples_per_row > 1

    def per_sample(values: list[Any]) -> Any:
        return values if many else values[0]

    row: dict[str, Any] = {
        "generated_text": per_sample([s.text for s in samples]),
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "finish_reason": per_sample([s.finish_reason for s in samples]),
        "sample_completion_tokens": [s.completion_tokens for s in samples],
        "token_logprobs": per_sample([s.token_logprobs for s in samples]),
        "top_logprobs": per_sample([_top_rows(s.top_logprobs) for s in samples]),
        "prompt_logprobs": c.prompt_logprobs,
        "prompt_top_logprobs": _top_rows(c.prompt_top_logprobs),
    }
    constraint = prompt.sampling.get("structured_outputs")
    if constraint is not None:
        row["structured_error"] = per_sample([structured_error(s, constraint) for s in samples])
    return row


def structured_error(sample: Sample, constraint: dict[str, Any]) -> str | None:
    """Why a constrained sample does not parse (None when it does). Constrained decoding
    keeps every token valid, but a sample cut off by max_tokens is an unfinished document."""
    text = sample.text
    cut = " (cut off at max_tokens)" if sample.finish_reason == "length" else ""
    if "json" in constraint:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"output is not valid JSON: {exc}{cut}"
        schema = constraint["json"]
        problem = jsonschema.exceptions.best_match(
            jsonschema.validators.validator_for(schema)(schema).iter_errors(value)
        )
        return None if problem is None else f"output does not match the schema: {problem.message}"
    if "regex" in constraint and not re.fullmatch(constraint["regex"], text):
        return f"output does not match the regex{cut}"
    if "choice" in constraint and text not in constraint["choice"]:
        return f"output is not one of the choices{cut}"
    return None


def _top_rows(top: list[list[TopLogprob]] | None) -> list[list[dict[str, Any]]] | None:
    if top is None:
        return None
    return [
        [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob} for t in at]
        for at in top
    ]


def row_seed(job_seed: int, row_key: Any) -> int:
    """A per-row seed from the job seed and the row's id: the same wherever the row runs."""
    digest = hashlib.blake2b(f"{job_seed}:{row_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def input_columns(job: JobSpec) -> list[str]:
    """The input columns a worker reads: prompt source, id, template fields, kept columns."""
    cols = [job.input.prompt_column or job.input.messages_column]
    if job.input.id_column:
        cols.append(job.input.id_column)
    if job.prompt_template:
        cols += template_fields(job.prompt_template)
    cols += job.input.keep_columns
    cols += job.row_overrides.columns().values()
    return list(dict.fromkeys(c for c in cols if c))


def output_schema(job: JobSpec, input_schema: pa.Schema) -> pa.Schema:
    key = job.input.id_column
    fields = [input_schema.field(key) if key else pa.field("row_id", pa.int64())]
    fields += [input_schema.field(c) for c in job.input.keep_columns if c != key]
    return pa.schema(fields + output_fields(job))


@dataclass
class RowPrompt:
    """One row ready for the engine, or the reason it cannot be run. `sampling` holds what
    this row sets on top of the job's sampling (its structured-output constraint too)."""

    key: Any
    prompt: str | None
    error: str | None
    token_ids: list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)


def row_sampling(job: JobSpec, row: RowPrompt) -> dict[str, Any]:
    """The sampling parameters of one row's request, with its placement-independent seed."""
    return {**job.sampling, **row.sampling, "seed": row_seed(job.seed, row.key)}


def build_prompts(
    job: JobSpec, table: pa.Table, first_row: int, chat: Callable[[list[dict[str, str]]], str]
) -> list[RowPrompt]:
    """Turn input rows into prompts: template, chat template, and per-row input errors."""
    cols = table.to_pydict()
    n = table.num_rows
    keys = cols[job.input.id_column] if job.input.id_column else range(first_row, first_row + n)
    fields = template_fields(job.prompt_template or "")
    job_sampling = (
        {"structured_outputs": job.structured_output.constraint()} if job.structured_output else {}
    )
    out = []
    for i, key in enumerate(keys):
        try:
            prompt = row_prompt(job, {c: v[i] for c, v in cols.items()}, fields)
            text = prompt if isinstance(prompt, str) else chat(prompt)
            own = row_overrides(job, {c: v[i] for c, v in cols.items()})
            sampling = {**job_sampling, **own} if own else job_sampling
            out.append(RowPrompt(key, text, None, sampling=sampling))
        except RowError as exc:
            out.append(RowPrompt(key, None, str(exc)))
    return out


class RowError(Exception):
    """This row cannot be run; the message becomes its `error` value."""


def row_overrides(job: JobSpec, row: dict[str, Any]) -> dict[str, Any]:
    """The sampling a row sets from its own columns (`row_overrides`); nulls keep the job's."""
    own: dict[str, Any] = {}
    for name, column in job.row_overrides.columns().items():
        value = row[column]
        if value is not None:
            own.update(_override(name, column, value))
    return own


def _override(name: str, column: str, value: Any) -> dict[str, Any]:
    if name == "max_tokens":
        whole = isinstance(value, (int, float)) and float(value).is_integer()
        if isinstance(value, bool) or not whole or value < 1:
            raise RowError(f"column {column!r}: max_tokens must be a positive whole number")
        return {"max_tokens": int(value)}
    if name == "temperature":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RowError(f"column {column!r}: temperature must be a number >= 0")
        return {"temperature": float(value)}
    if name == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise RowError(f"column {column!r}: stop must be a string or a list of strings")
        return {"stop": stops}
    if not isinstance(value, str):
        raise RowError(f"column {column!r}: json_schema must be a JSON string")
    try:
        return {"structured_outputs": {"json": _row_schema(value)}}
    except ValueError as exc:
        raise RowError(f"column {column!r}: {exc}") from None


@functools.lru_cache(maxsize=256)
def _row_schema(text: str) -> dict[str, Any]:
    """Parsed and checked once per distinct schema (rows usually share a few)."""
    return json_schema(text)


def row_prompt(
    job: JobSpec, row: dict[str, Any], fields: list[str]
) -> str | list[dict[str, str]]:
    """A row's prompt before the chat template: plain text, or the chat messages when the chat
    template applies. `fields` are the prompt template's columns (parsed once per unit). The
    planner samples prompt lengths through this same function."""
    if job.input.messages_column:
        messages = row[job.input.messages_column]
        if not messages:
            raise RowError("messages are null or empty")
        try:
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        except (KeyError, TypeError) as exc:
            raise RowError(f"messages must be a list of {{role, content}}: {exc}") from None
    value = row[job.input.prompt_column]
    if value is None:
        raise RowError("prompt is null")
    if job.prompt_template:
        if any(row.get(f) is None for f in fields):
            raise RowError("a column used by prompt_template is null")
        try:
            value = job.prompt_template.format(**row)
        except (KeyError, IndexError, ValueError) as exc:
            raise RowError(f"prompt_template does not apply to this row: {exc}") from None
    if not str(value).strip():
        raise RowError("prompt is empty")
    return [{"role": "user", "content": str(value)}] if job.chat else str(value)


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
    for f in output_fields(job):
        if f.name == "instance":
            columns[f.name] = pa.array([instance] * n, f.type)
        else:
            columns[f.name] = pa.array([r.get(f.name) for r in results], f.type)
    return pa.Table.from_pydict(columns, schema=schema)
