"""What an input row asks of the engine: its prompt and its sampling seed.

One set of rules for everyone who turns rows into requests: the workers, the planner's sample
of prompt lengths and the profiler's short real run, so that all of them see the same prompts.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from hetbatch.spec import JobSpec, json_schema, template_fields


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
    if job.lora is not None and job.lora.column:
        cols.append(job.lora.column)
    return list(dict.fromkeys(c for c in cols if c))


@dataclass
class RowPrompt:
    """One row ready for the engine, or the reason it cannot be run. `sampling` holds what
    this row sets on top of the job's sampling (its structured-output constraint too)."""

    key: Any
    prompt: str | None
    error: str | None
    token_ids: list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    url: str | None = None  # OpenAI batch requests: the endpoint the row asked for
    adapter: tuple[str, int, str] | None = None  # LoRA: name, vLLM id, local folder
    add_special_tokens: bool = True  # False: the chat template wrote them (OpenAI chat)


def row_sampling(job: JobSpec, row: RowPrompt) -> dict[str, Any]:
    """The sampling parameters of one row's request, with its placement-independent seed
    (unless the row sets its own: an OpenAI request's body may)."""
    return {**job.sampling, "seed": row_seed(job.seed, row.key), **row.sampling}


def build_prompts(
    job: JobSpec,
    table: pa.Table,
    first_row: int,
    chat: Callable[[list[dict[str, str]]], str],
    input_rows: Sequence[int] | None = None,
) -> list[RowPrompt]:
    """Turn input rows into prompts: template, chat template, and per-row input errors.
    Rows are keyed by id, else by input row index: `first_row` on, or `input_rows` when the
    table's rows are not consecutive input rows (prefix order)."""
    if job.input.format == "openai-batch":
        return request_prompts(job, table, chat)
    cols = table.to_pydict()
    n = table.num_rows
    keys = (
        cols[job.input.id_column] if job.input.id_column
        else input_rows if input_rows is not None else range(first_row, first_row + n)
    )
    fields = template_fields(job.prompt_template or "")
    job_sampling = (
        {"structured_outputs": job.structured_output.constraint()} if job.structured_output else {}
    )
    out = []
    for i, key in enumerate(keys):
        row = {c: v[i] for c, v in cols.items()}
        try:
            prompt = row_prompt(job, row, fields)
            text = prompt if isinstance(prompt, str) else chat(prompt)
            own = row_overrides(job, row)
            sampling = {**job_sampling, **own} if own else job_sampling
            adapter = None
            if job.lora is not None and job.lora.column:
                adapter = _adapter(job, job.lora.column, cols[job.lora.column][i])
            out.append(RowPrompt(key, text, None, sampling=sampling, adapter=adapter))
        except RowError as exc:
            out.append(RowPrompt(key, None, str(exc)))
    return out


class RowError(Exception):
    """This row cannot be run; the message becomes its `error` value."""


def request_prompts(
    job: JobSpec, table: pa.Table, chat: Callable[[list[dict[str, str]]], str]
) -> list[RowPrompt]:
    """OpenAI batch request lines to prompts: a body's sampling fields override the job's;
    chat messages go through the model's chat template, whose text is taken as it is (as
    vLLM's chat endpoint does, so no second BOS)."""
    from hetbatch.openai_batch import RequestError, parse_request

    job_sampling = (
        {"structured_outputs": job.structured_output.constraint()} if job.structured_output else {}
    )
    per_row_n_fits = job.output.format == "openai-batch"
    out = []
    for cid, line, source in zip(*table.to_pydict().values(), strict=True):
        try:
            _, url, prompt, own = parse_request(line)
            if not per_row_n_fits and own.get("n", job.samples_per_row) != job.samples_per_row:
                raise RequestError(
                    f"body.n {own['n']} differs from the job's sampling.n "
                    f"{job.samples_per_row}: Parquet output holds the same n for every row "
                    "(use output.format: openai-batch)"
                )
            text = prompt if isinstance(prompt, str) else chat(prompt)
            model = json.loads(line)["body"].get("model") if job.lora is not None else None
            named = isinstance(model, str) and model in job.lora_names
            adapter = _adapter(job, "body.model", model) if named else None
            out.append(RowPrompt(cid, text, None, sampling={**job_sampling, **own}, url=url,
                                 add_special_tokens=isinstance(prompt, str), adapter=adapter))
        except RequestError as exc:
            # A line without a custom_id is known by where it is (a key, for the id checks).
            out.append(RowPrompt(cid if cid is not None else source, None, f"{source}: {exc}"))
    return out


def _adapter(job: JobSpec, where: str, name: Any) -> tuple[str, int, str] | None:
    from hetbatch.lora import adapter_request

    assert job.lora is not None
    try:
        return adapter_request(job.lora, name)
    except KeyError:
        known = ", ".join(sorted(job.lora.adapters))
        raise RowError(f"{where}: unknown LoRA adapter {name!r} (known: {known})") from None


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
        return {"structured_outputs": {"json": checked_schema(value)}}
    except ValueError as exc:
        raise RowError(f"column {column!r}: {exc}") from None


@functools.lru_cache(maxsize=256)
def checked_schema(text: str) -> dict[str, Any]:
    """A row's JSON schema (JSON text), parsed and checked once per distinct schema: checking
    one against the meta-schema takes about a millisecond, and rows usually share a few."""
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
