"""The job file: parsed once into typed, validated objects.

Nothing downstream re-reads YAML. Every validation error names the field path (`sampling.top_p`)
and the file, so that a typo costs one glance rather than a traceback.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hetbatch.error_budget import BudgetConfig
from hetbatch.errors import UserError
from hetbatch.scheduler.core import SchedulerConfig
from hetbatch.validate import JobError, check_job


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """The model and the engine arguments passed to vLLM as they are."""

    path: str = Field(description="a local folder or a hub name")
    engine_args: dict[str, Any] = Field(default_factory=dict)


class InputSpec(_Strict):
    path: str = Field(description="fsspec path: a file, a directory or a glob")
    format: Literal["parquet", "openai-batch"] = Field(
        default="parquet",
        description="Parquet rows, or OpenAI batch JSONL requests (custom_id, method, url, body)",
    )
    prompt_column: str | None = None
    messages_column: str | None = None
    id_column: str | None = None
    id_is_key: bool = Field(
        default=True,
        description="refuse null ids and report duplicates; false when ids may repeat",
    )
    cast_prompt: bool = Field(
        default=False, description="accept a non-text prompt column, converting values to text"
    )
    keep_columns: list[str] = Field(default_factory=list)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to the fsspec driver, e.g. endpoint_url"
    )

    @model_validator(mode="before")
    @classmethod
    def _requests_keyed_by_custom_id(cls, data: Any) -> Any:
        """OpenAI batch requests name themselves by `custom_id`: that is the rows' id."""
        if isinstance(data, dict) and data.get("format") == "openai-batch":
            return {"id_column": "custom_id", **data}
        return data

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSpec:
        if self.format == "openai-batch":
            if self.prompt_column or self.messages_column or self.keep_columns:
                raise ValueError(
                    "openai-batch requests carry their own prompts: prompt_column, "
                    "messages_column and keep_columns do not apply"
                )
            if self.id_column != "custom_id":
                raise ValueError("openai-batch requests are keyed by custom_id: drop id_column")
            return self
        if (self.prompt_column is None) == (self.messages_column is None):
            raise ValueError("give exactly one of prompt_column and messages_column")
        return self


class OutputSpec(_Strict):
    path: str
    format: Literal["parquet", "openai-batch"] = Field(
        default="parquet",
        description="Parquet shards, or JSONL shards in OpenAI's batch output layout",
    )
    compression: Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"] = "zstd"
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to the fsspec driver, e.g. endpoint_url"
    )


class SimEngineSpec(_Strict):
    """Speed of the simulated engine: aggregate tokens/s at a full batch."""

    tokens_per_s: float = Field(default=2000.0, gt=0)
    max_num_seqs: int = Field(default=64, ge=1)
    hang_file: str | None = Field(
        default=None,
        description="for fault tests: an engine that finds this file deletes it and hangs",
    )


class SlurmJobOptions(_Strict):
    """What a cluster's Slurm wants to hear about a job: where it may run and for how long."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = Field(default=None, description="wall time limit, e.g. 24:00:00")
    constraint: str | None = None
    mem: str | None = Field(default=None, description="memory per node, e.g. 64G")
    cpus_per_task: int | None = Field(default=None, ge=1)
    extra: list[str] = Field(
        default_factory=list, description="more sbatch options, e.g. --exclusive"
    )


class PoolSlurmSpec(SlurmJobOptions):
    """Slurm options of one pool's worker jobs."""

    gres_type: str | None = Field(
        default=None,
        description="GPU type in --gres=gpu:TYPE:N; default the accelerator in lower case, "
        "'' for untyped --gres=gpu:N",
    )
    array: bool = Field(
        default=True, description="several nodes as an array of one-node jobs, else one job"
    )


class SlurmSpec(SlurmJobOptions):
    """Slurm options of the coordinator job, and how long workers wait for a coordinator."""

    job_name: str = Field(default="hetbatch", pattern=r"^[A-Za-z0-9_.-]+$")
    reconnect_s: float = Field(
        default=900.0,
        gt=0,
        description="how long workers wait for a coordinator that went away (a resubmit)",
    )


class PoolSpec(_Strict):
    """A group of identical nodes: accelerator type x devices per node x nodes."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    accelerator: str
    devices_per_node: int = Field(ge=1)
    nodes: int = Field(default=1, ge=1)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    pipeline_parallel_size: int | None = Field(
        default=None, ge=1, description="pipeline stages; an instance larger than a node spans"
    )
    instances_per_node: int | None = Field(default=None, ge=1)
    capacity_weight: float | None = Field(default=None, gt=0)
    price_per_device_hour: float | None = Field(
        default=None, ge=0, description="dollars per device-hour, for the run's cost figures"
    )
    engine_args: dict[str, Any] = Field(default_factory=dict)
    sim: SimEngineSpec | None = None
    slurm: PoolSlurmSpec = Field(default_factory=PoolSlurmSpec)

    @model_validator(mode="after")
    def _layout_fits(self) -> PoolSpec:
        tp, pp = self.tensor_parallel_size or 1, self.pipeline_parallel_size or 1
        span = -(-tp * pp // self.devices_per_node)
        if span > 1:
            if tp * pp % span or self.nodes % span:
                raise ValueError(
                    f"an instance of tensor_parallel_size {tp} x pipeline_parallel_size {pp} "
                    f"spans {span} nodes of {self.devices_per_node} devices: it must fill each "
                    f"evenly and nodes ({self.nodes}) must be a multiple of {span}"
                )
            if self.instances_per_node not in (None, 1):
                raise ValueError("an instance that spans nodes takes instances_per_node 1")
            return self
        if self.instances_per_node and self.instances_per_node * tp * pp > self.devices_per_node:
            raise ValueError(
                f"instances_per_node {self.instances_per_node} x tensor_parallel_size {tp} "
                f"x pipeline_parallel_size {pp} needs more than devices_per_node "
                f"{self.devices_per_node}"
            )
        return self


class StructuredOutputSpec(_Strict):
    """Constrained decoding for every row: output that matches a JSON schema, a regular
    expression, or one of a list of choices (vLLM's structured outputs)."""

    json_schema: dict[str, Any] | str | None = Field(
        default=None, description="a JSON schema, as a mapping or a JSON string"
    )
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_constraint(self) -> StructuredOutputSpec:
        given = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of json_schema, regex and choice")
        if self.json_schema is not None:
            json_schema(self.json_schema)
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return self

    def constraint(self) -> dict[str, Any]:
        """vLLM's StructuredOutputsParams fields for this constraint."""
        if self.json_schema is not None:
            return {"json": json_schema(self.json_schema)}
        if self.regex is not None:
            return {"regex": self.regex}
        return {"choice": list(self.choice or ())}


def json_schema(value: dict[str, Any] | str) -> dict[str, Any]:
    """A JSON schema given as a mapping or a JSON string, checked against the JSON Schema
    meta-schema; ValueError with one line on anything else."""
    import jsonschema

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("json_schema must be a JSON object")
    try:
        jsonschema.validators.validator_for(value).check_schema(value)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"json_schema is not a valid JSON schema: {exc.message}") from None
    return value


class RowOverridesSpec(_Strict):
    """Input columns that set a row's own sampling; a null cell keeps the job's value."""

    max_tokens: str | None = Field(default=None, description="column of whole numbers")
    temperature: str | None = Field(default=None, description="column of numbers")
    stop: str | None = Field(default=None, description="column of strings or lists of strings")
    json_schema: str | None = Field(
        default=None, description="column of JSON schemas (JSON strings) for structured output"
    )

    def columns(self) -> dict[str, str]:
        """Overridden field -> input column."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class LoraSpec(_Strict):
    """LoRA adapters a row may ask for: by name, from a column (or, for OpenAI batch requests,
    the body's `model`). A null or absent name runs the base model."""

    adapters: dict[str, str] = Field(
        min_length=1, description="adapter name -> folder (local path or fsspec URL)"
    )
    column: str | None = Field(default=None, description="input column naming a row's adapter")
    max_lora_rank: int = Field(default=16, ge=1)
    max_loras: int | None = Field(
        default=None, ge=1, description="adapters in one batch; default all of them (up to 8)"
    )

    def slots(self) -> int:
        """vLLM's adapter slots: one more than the adapters a batch may hold. vLLM 0.32's CPU
        backend applies its last slot to rows without an adapter, so it must stay empty."""
        return (self.max_loras or min(len(self.adapters), 8)) + 1

    def adapter_id(self, name: str) -> int:
        """vLLM's integer id of an adapter: stable across workers (its rank by name)."""
        return sorted(self.adapters).index(name) + 1


class ClusterSpec(_Strict):
    pools: list[PoolSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ClusterSpec:
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique, repeated: {', '.join(dupes)}")
        priced = [p.price_per_device_hour is not None for p in self.pools]
        if any(priced) and not all(priced):
            missing = self.pools[priced.index(False)].name
            raise ValueError(
                f"pool {missing!r} has no price_per_device_hour: price every pool or none"
            )
        return self


class SchedulerSpec(_Strict):
    """The scheduler's settings a job may change; defaults are the scheduler's own."""

    policy: Literal["hetbatch"] = "hetbatch"
    min_unit_rows: int = Field(default=SchedulerConfig.min_unit_rows, ge=1)
    max_unit_rows: int = Field(default=SchedulerConfig.max_unit_rows, ge=1)
    factor: float = Field(
        default=SchedulerConfig.factor, ge=1.0, description="weighted-factoring divisor"
    )
    lease_timeout_s: float = Field(default=SchedulerConfig.lease_timeout_s, gt=0)
    heartbeat_s: float = Field(default=1.0, gt=0)
    prefix_groups: bool | Literal["auto"] = Field(
        default="auto",
        description="deal rows that share a prompt prefix together, to the same instance: "
        "true, false, or auto (on when a sample of the input shows long shared prefixes)",
    )
    prefix_window_rows: int = Field(
        default=16384, ge=1, description="rows grouped by prefix within windows of this many"
    )
    longest_first: bool = Field(
        default=True,
        description="deal rows that may decode longest early, from the per-row max_tokens "
        "column (row_overrides.max_tokens) read before the job starts; false: input order",
    )

    @field_validator("prefix_groups", mode="before")
    @classmethod
    def _prefix_groups_value(cls, value: Any) -> Any:
        if not (isinstance(value, bool) or value == "auto"):
            raise ValueError(f"expected true, false or auto, not {value!r}")
        return value

    @model_validator(mode="after")
    def _unit_bounds(self) -> SchedulerSpec:
        if self.min_unit_rows > self.max_unit_rows:
            raise ValueError("min_unit_rows must not exceed max_unit_rows")
        return self


class EngineSpec(_Strict):
    kind: Literal["vllm", "sim"] = "vllm"
    sim: SimEngineSpec = Field(default_factory=SimEngineSpec)
    multiprocessing: bool | None = Field(
        default=None,
        description="vLLM engine core in its own process; default: chosen per job, in its own "
        "process when an instance's share of the output tokens repays the slower start",
    )
    hang_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="an engine step that holds requests and takes longer than this is hung: "
        "the worker gives its leases back and is restarted",
    )


class ReplanSpec(_Strict):
    """Re-planning a pool mid-job when its measured speed is far from its plan."""

    enabled: bool = False
    threshold: float = Field(
        default=0.25, gt=0, description="measured/predicted tokens/s off by more than this "
        "share re-fits the pool's coefficients",
    )
    margin: float = Field(
        default=0.15, ge=0, description="a new configuration must promise this much more",
    )
    min_units: int = Field(default=3, ge=1, description="units an instance commits first")
    min_active_s: float = Field(default=10.0, ge=0, description="seconds it works first")
    check_s: float = Field(default=5.0, gt=0, description="how often the pools are checked")


class CoordinatorSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # serves Prometheus /metrics


class LaunchSpec(_Strict):
    max_worker_restarts: int = Field(default=2, ge=0)


class JobSpec(_Strict):
    model: ModelSpec
    input: InputSpec
    output: OutputSpec
    cluster: ClusterSpec
    prompt_template: str | None = None
    chat: bool = False
    task: Literal["generate", "embed", "classify"] = Field(
        default="generate",
        description="generate text, or one vector per row: an embedding or class scores",
    )
    sampling: dict[str, Any] = Field(default_factory=lambda: {"max_tokens": 64})
    structured_output: StructuredOutputSpec | None = None
    row_overrides: RowOverridesSpec = Field(default_factory=RowOverridesSpec)
    lora: LoraSpec | None = None
    seed: int = 0
    max_error_rate: float = Field(
        default=BudgetConfig.max_error_rate,
        ge=0,
        le=1,
        description="stop the job when more than this share of any 1,000 rows fail "
        "(or all of the first 100); 1 never stops",
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    coordinator: CoordinatorSpec = Field(default_factory=CoordinatorSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    replan: ReplanSpec = Field(default_factory=ReplanSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    accelerators: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="accelerator types to add to the catalog, or figures to correct in it",
    )

    @model_validator(mode="after")
    def _template_and_sampling(self) -> JobSpec:
        if self.prompt_template is not None:
            template_fields(self.prompt_template)
        _check_output_shaping(self.sampling)
        _check_openai_batch(self)
        if self.lora is not None and self.task != "generate":
            raise ValueError(f"lora does not apply to task {self.task}")
        if self.lora is not None and (self.lora.column is None) == (
            self.input.format == "parquet"
        ):
            raise ValueError(
                "lora.column names the adapter column of Parquet input; OpenAI batch "
                "requests name theirs in body.model"
            )
        if self.task != "generate":
            _check_pooling(self)
        if self.replan.enabled:
            _check_replan(self)
        return self

    @property
    def structured(self) -> bool:
        """Whether any row may be constrained (job-wide, or by a schema column)."""
        return self.structured_output is not None or self.row_overrides.json_schema is not None

    @property
    def lora_names(self) -> set[str]:
        """Names of the job's LoRA adapters (none without `lora`)."""
        return set(self.lora.adapters) if self.lora is not None else set()

    @property
    def samples_per_row(self) -> int:
        """Completions per row (`sampling.n`); above one, per-sample columns are lists."""
        return int(self.sampling.get("n", 1))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_output_shaping(sampling: dict[str, Any]) -> None:
    """The sampling fields that decide the output's columns must be valid before any row runs:
    a bad one would otherwise fail every row alike."""
    n = sampling.get("n", 1)
    if not _is_int(n) or n < 1:
        raise ValueError(f"sampling.n must be a whole number of samples per row, not {n!r}")
    for name in ("logprobs", "prompt_logprobs"):
        k = sampling.get(name)
        if k is not None and (not _is_int(k) or k < -1):
            raise ValueError(
                f"sampling.{name} must be a number of top tokens (0 or more, -1 for all), "
                f"not {k!r}"
            )


def _check_openai_batch(job: JobSpec) -> None:
    """OpenAI batch requests bring their prompts and sampling; OpenAI batch output is text."""
    if job.input.format == "openai-batch":
        given = [k for k in ("prompt_template", "chat") if getattr(job, k)]
        if given:
            raise ValueError(
                f"{given[0]} does not apply to openai-batch input: each request carries its "
                "messages (chat) or prompt (completions)"
            )
        if job.row_overrides.columns():
            raise ValueError("row_overrides do not apply to openai-batch input: bodies override")
    if "openai-batch" in (job.input.format, job.output.format) and job.task != "generate":
        raise ValueError(f"task {job.task} does not apply to openai-batch input or output")


def _check_replan(job: JobSpec) -> None:
    """Re-planning changes what the planner chose: it needs a pool the planner sizes."""
    if job.engine.kind != "vllm":
        raise ValueError("replan.enabled needs engine kind vllm (the simulated engine has no plan)")
    if all(p.tensor_parallel_size is not None for p in job.cluster.pools):
        raise ValueError(
            "replan.enabled needs a pool the planner sizes; every pool pins tensor_parallel_size"
        )


def _check_pooling(job: JobSpec) -> None:
    """A pooling task makes one vector per row: what shapes generated text does not apply."""
    shaping = [k for k in ("n", "logprobs", "prompt_logprobs") if k in job.sampling]
    if shaping:
        raise ValueError(f"sampling.{shaping[0]} does not apply to task {job.task}")
    if job.structured_output is not None:
        raise ValueError(f"structured_output does not apply to task {job.task}")
    if job.row_overrides.columns():
        raise ValueError(f"row_overrides do not apply to task {job.task}")


def template_fields(template: str) -> list[str]:
    """The column names a `str.format` prompt template refers to."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt_template is not a valid format string: {exc}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    if any(not n or not n.isidentifier() for n in names):
        raise ValueError("prompt_template fields must be column names, as in {prompt}")
    return names


def _format_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ""
    for part in err["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required field is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    where = f"{source}: {loc}: " if loc else f"{source}: "
    return f"{where}{msg}{more}"


def parse_job(data: Any, source: str = "job") -> JobSpec:
    """Validate a job given as a mapping; raise UserError naming the field on any mistake."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: the job file must be a mapping of keys to values")
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(_format_error(source, exc)) from None
    try:
        check_job(job)
    except JobError as exc:
        raise UserError(f"{source}: {exc}") from None
    return job


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: job file not found") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read job file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}:{line}: {problem}") from None
    return parse_job(data, str(path))
