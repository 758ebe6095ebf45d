"""Rows out: the output shard of a unit, built from its input rows and their completions.

With `sampling.n > 1` the per-sample columns are lists of n values; log-probability and
structured-output columns appear only when the job asks for them; pooling tasks (embed,
classify) give a vector column instead of text.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

import jsonschema
import pyarrow as pa

from hetbatch.engines.base import Completion, Sample, TopLogprob
from hetbatch.io.shards import stage_jsonl, stage_shard
from hetbatch.openai_batch import CHAT, COMPLETIONS, dumps, output_line
from hetbatch.prompts import RowPrompt
from hetbatch.spec import JobSpec

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
    if job.output.format == "openai-batch":
        return _response_values(c, samples, prompt)
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


def _response_values(
    c: Completion, samples: tuple[Sample, ...], prompt: RowPrompt
) -> dict[str, Any]:
    """What an OpenAI batch output line needs of a finished request: every sample, whatever
    n the row asked for."""
    constraint = prompt.sampling.get("structured_outputs")
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "constrained": constraint is not None or None,
        "samples": [
            {
                "text": s.text,
                "finish_reason": s.finish_reason,
                "token_logprobs": s.token_logprobs,
                "top_logprobs": _top_rows(s.top_logprobs),
                "tokens": s.tokens,
                "structured_error": structured_error(s, constraint) if constraint else None,
            }
            for s in samples
        ],
    }


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


def stage_unit(
    job: JobSpec,
    schema: pa.Schema,
    table: pa.Table,
    start: int,
    end: int,
    results: list[dict[str, Any]],
    prompts: list[RowPrompt],
    instance: str,
    name: str,
    input_rows: Sequence[int] | None = None,
    band: tuple[int, int | None] = (0, None),
) -> str:
    """Write one unit's output to staging in the job's output format; returns the handle the
    coordinator publishes. `name` is the staged file's name without its suffix; `input_rows`
    are the rows' input indices when they are not `start` on (prefix order, or only some rows
    of the unit: those needing context in `band`)."""
    rows = input_rows if input_rows is not None else range(start, end)
    output = job.output
    if output.format == "openai-batch":
        lines, errors = openai_lines(job, table, prompts, results, rows)
        return stage_jsonl(
            output.path, output.storage_options, f"{name}.jsonl", start, end, lines, errors,
            band,
        )
    shard = build_output(job, schema, table, rows, results, instance)
    return stage_shard(
        output.path, output.storage_options, f"{name}.parquet", start, end, shard,
        output.compression, band,
    )


def openai_lines(
    job: JobSpec,
    table: pa.Table,
    prompts: list[RowPrompt],
    results: list[dict[str, Any]],
    rows: Sequence[int],
) -> tuple[bytes, bytes]:
    """A unit's rows as OpenAI batch output lines: every row, and the failed ones again.
    A request's custom_id is its own (null for a line that gives none); other input rows are
    known by their id, or their row number."""
    default_url = CHAT if job.chat or job.input.messages_column else COMPLETIONS
    if job.input.format == "openai-batch":
        ids = table.column("custom_id").to_pylist()
    else:
        ids = [str(p.key) for p in prompts]
    created = int(time.time())
    lines, errors = [], []
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        url = p.url or default_url
        line = dumps(output_line(ids[i], url, job.model.path, r, rows[i], created))
        lines.append(line)
        if r.get("error") is not None:
            errors.append(line)

    def joined(rows: list[str]) -> bytes:
        return "".join(f"{row}\n" for row in rows).encode()

    return joined(lines), joined(errors)


def output_schema(job: JobSpec, input_schema: pa.Schema) -> pa.Schema:
    key = job.input.id_column
    fields = [input_schema.field(key) if key else pa.field("row_id", pa.int64())]
    fields += [input_schema.field(c) for c in job.input.keep_columns if c != key]
    return pa.schema(fields + output_fields(job))


def build_output(
    job: JobSpec,
    schema: pa.Schema,
    table: pa.Table,
    rows: Sequence[int],
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
        columns["row_id"] = pa.array(rows, pa.int64())
    for c in job.input.keep_columns:
        if c != key:
            columns[c] = table.column(c)
    for f in output_fields(job):
        if f.name == "instance":
            columns[f.name] = pa.array([instance] * n, f.type)
        else:
            columns[f.name] = pa.array([r.get(f.name) for r in results], f.type)
    return pa.Table.from_pydict(columns, schema=schema)
