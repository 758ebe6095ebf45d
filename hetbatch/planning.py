"""Planning a job file: the files the pure planner is fed from, read here.

Model profile, pools and a workload sampled from the job's Parquet input, and calibration
files. The workload is measured, not guessed: a sample of the input's prompt column is rendered
the way the worker renders it (template, chat template) and counted with the model's own
tokenizer when a local one loads, else estimated at four bytes a token.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetbatch.errors import UserError
from hetbatch.io.parquet import open_dataset, read_rows
from hetbatch.planner.calibration import Calibration
from hetbatch.planner.catalog import Catalog, with_overrides
from hetbatch.planner.profile import ModelProfile, load_model_profile
from hetbatch.planner.search import plan_cluster
from hetbatch.planner.types import ClusterPlan, PoolRequest, Workload
from hetbatch.prompts import RowError, row_prompt
from hetbatch.spec import JobSpec, template_fields

SAMPLE_CHUNKS = 4
BYTES_PER_TOKEN = 4.0
_DTYPES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
           "bfloat16": "bf16"}


@dataclass(frozen=True)
class JobPlanInputs:
    """What a job file contributes to planning."""

    model: ModelProfile
    pools: list[PoolRequest]
    workload: Workload
    objective: str = "throughput"
    deadline_s: float | None = None
    catalog: Catalog | None = None
    calibration: Calibration | None = None


def load_calibration(path: str | Path) -> Calibration:
    """A calibration file written by `hetbatch profile`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read calibration file {path}: {exc}") from exc
    return Calibration.from_dict(data)


def save_calibration(calibration: Calibration, path: str | Path) -> None:
    Path(path).write_text(json.dumps(calibration.to_dict(), indent=2, sort_keys=True) + "\n")


def plan_job(
    job: JobSpec, calibration: Calibration | None = None, sample_rows: int = 2000,
    objective: str = "throughput", top_k: int = 3,
) -> ClusterPlan:
    """The cluster plan for a job: one deployment per pool with its expected tokens/s."""
    inputs = job_plan_inputs(job, calibration, sample_rows)
    return plan_cluster(inputs.model, inputs.pools, inputs.workload, objective=objective,
                        catalog=inputs.catalog, calibration=inputs.calibration, top_k=top_k)


def job_plan_inputs(
    job: JobSpec, calibration: Calibration | None = None, sample_rows: int = 2000
) -> JobPlanInputs:
    """Model, pools and workload of a job file."""
    model = model_from_job(job)
    catalog = with_overrides(job.accelerators) if job.accelerators else None
    return JobPlanInputs(model, pools_from_job(job), workload_from_job(job, sample_rows),
                         catalog=catalog, calibration=calibration)


def model_from_job(job: JobSpec) -> ModelProfile:
    """The model's profile under the weight format the engine arguments ask for."""
    args = job.model.engine_args
    quant = str(args["quantization"]).lower() if args.get("quantization") == "fp8" else None
    if quant is None and args.get("dtype") not in (None, "auto"):
        quant = _DTYPES.get(str(args["dtype"]).lower())
    return load_model_profile(job.model.path, quant)


def pools_from_job(job: JobSpec) -> list[PoolRequest]:
    """Pool requests; pinned TP, instances per node, max_num_seqs and max_num_batched_tokens
    (in the model's or the pool's engine_args) restrict the search."""
    out = []
    for p in job.cluster.pools:
        args = {**job.model.engine_args, **p.engine_args}
        out.append(PoolRequest(
            name=p.name, accelerator=p.accelerator, devices_per_node=p.devices_per_node,
            nodes=p.nodes, tensor_parallel_size=p.tensor_parallel_size,
            instances_per_node=p.instances_per_node,
            max_num_seqs=_int_or_none(args.get("max_num_seqs")),
            max_num_batched_tokens=_int_or_none(args.get("max_num_batched_tokens")),
        ))
    return out


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def workload_from_job(job: JobSpec, sample_rows: int = 2000) -> Workload:
    """Prompt lengths from a sample of the input; output length from sampling.max_tokens."""
    columns = _prompt_columns(job)
    dataset = open_dataset(
        job.input.path, columns, job.input.storage_options, input_format=job.input.format
    )
    fields = template_fields(job.prompt_template or "")
    rows = _sample(dataset, columns, sample_rows)
    prompts = [p for p in (_render(job, row, fields) for row in rows) if p is not None]
    if not prompts:
        raise UserError(f"{job.input.path}: the sampled rows hold no usable prompt")
    counter = token_counter(job.model.path)
    max_tokens = int(job.sampling.get("max_tokens") or 16)
    return Workload.from_samples([max(1, counter(p)) for p in prompts], float(max_tokens),
                                 rows=dataset.num_rows, output_len_max=max_tokens)


def _prompt_columns(job: JobSpec) -> list[str]:
    if job.input.format == "openai-batch":
        return ["request"]
    if job.input.messages_column:
        return [job.input.messages_column]
    fields = template_fields(job.prompt_template) if job.prompt_template else []
    return sorted({str(job.input.prompt_column), *fields})


def _sample(dataset: Any, columns: Sequence[str], sample_rows: int) -> list[dict[str, Any]]:
    """Up to `sample_rows` rows in a few evenly spaced chunks, reading only their row groups."""
    total = dataset.num_rows
    want = max(1, min(sample_rows, total))
    chunks = min(SAMPLE_CHUNKS, want)
    size = want // chunks
    rows: list[dict[str, Any]] = []
    for k in range(chunks):
        start = (total - size) * k // max(1, chunks - 1) if chunks > 1 else 0
        rows.extend(read_rows(dataset, start, start + size, columns).to_pylist())
    return rows


def _render(
    job: JobSpec, row: dict[str, Any], fields: list[str]
) -> list[dict[str, str]] | str | None:
    """The row's prompt exactly as a worker builds it, or None for a row that would error."""
    if job.input.format == "openai-batch":
        from hetbatch.openai_batch import RequestError, parse_request

        try:
            return parse_request(row["request"])[2]
        except RequestError:
            return None
    try:
        return row_prompt(job, row, fields)
    except RowError:
        return None


def token_counter(model_path: str) -> Callable[[list[dict[str, str]] | str], int]:
    """Token count of a prompt or chat: the model's tokenizer and chat template when a local
    tokenizer.json loads, else bytes / 4."""
    folder = Path(model_path)
    tok = _load_tokenizer(folder)
    template = _load_chat_template(folder)

    def count(prompt: list[dict[str, str]] | str) -> int:
        text = prompt if isinstance(prompt, str) else _chat_text(prompt, template)
        if tok is None:
            return max(1, round(len(text.encode()) / BYTES_PER_TOKEN))
        return len(tok.encode(text).ids)

    return count


def _chat_text(messages: list[dict[str, str]], template: Callable[..., str] | None) -> str:
    if template is None:
        return "\n".join(m["content"] for m in messages)
    return template(messages)


def _load_tokenizer(folder: Path) -> Any:
    if not (folder / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # a tokenizer that does not load falls back to the byte estimate
        return None


def _load_chat_template(folder: Path) -> Callable[..., str] | None:
    """The model's chat template as a function of the messages, rendered as vLLM renders it."""
    config: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "tokenizer_config.json").read_text())
    source = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text()
    if not isinstance(source, str):
        return None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compiled = ImmutableSandboxedEnvironment().from_string(source)
    except Exception:  # no jinja2 or a template it cannot parse: count the contents only
        return None
    specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, **specials)

    return render


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)

