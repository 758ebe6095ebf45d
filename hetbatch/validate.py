"""Checks of a job against what vLLM and the accelerator catalog accept, made when the job file
is loaded: a mistake of the job must stop it before an engine starts or a Slurm job is queued,
not turn every row into the same per-row error.

Sampling fields and engine arguments are checked against vLLM's own `SamplingParams` and
`EngineArgs` when the installed vLLM is not the version `hetbatch.vllm_mirror` mirrors, and
against the mirror otherwise (same verdicts, tested; no 7 s vLLM import on every command, and it
works where vLLM is not installed, e.g. a Slurm login node).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from hetbatch import vllm_mirror

if TYPE_CHECKING:
    from hetbatch.spec import JobSpec


class JobError(ValueError):
    """A mistake in one field of the job: `field` is its path, e.g. `sampling.top_p`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`, did you mean X?` for the closest known names (difflib), or nothing."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    return f", did you mean {' or '.join(close)}?" if close else ""


def check_job(job: JobSpec) -> None:
    """Every check that needs neither the input nor an engine; raises JobError."""
    check_sampling(job.sampling)
    check_engine_args(job.model.engine_args, "model.engine_args")
    for i, pool in enumerate(job.cluster.pools):
        check_engine_args(pool.engine_args, f"cluster.pools[{i}].engine_args")
    check_accelerators(job)
    check_task_head(job)


# -- sampling ---------------------------------------------------------------------------------


def check_sampling(sampling: Mapping[str, Any]) -> None:
    """Names, types and ranges of the sampling fields, as vLLM's SamplingParams sees them."""
    if _use_installed_vllm():
        _check_sampling_with_vllm(sampling)
    else:
        _check_sampling_with_mirror(sampling)


def _check_sampling_with_mirror(sampling: Mapping[str, Any]) -> None:
    known = set(vllm_mirror.SamplingParamsMirror.model_fields)
    for name in sampling:
        _check_sampling_name(str(name), known)
    try:
        vllm_mirror.SamplingParamsMirror.model_validate(dict(sampling))
    except ValidationError as exc:
        err = exc.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["loc"]:
            got = f", got {err['input']!r}" if err["type"] != "extra_forbidden" else ""
            raise JobError(f"sampling.{err['loc'][0]}", message + got) from None
        field, _, rest = message.partition(": ")
        raise JobError(f"sampling.{field}", rest) from None


def _check_sampling_name(name: str, known: set[str]) -> None:
    if name in vllm_mirror.NOT_FROM_JOB:
        raise JobError(f"sampling.{name}", vllm_mirror.NOT_FROM_JOB[name])
    if name not in known:
        raise JobError(f"sampling.{name}", "unknown field" + did_you_mean(name, sorted(known)))


def _check_sampling_with_vllm(sampling: Mapping[str, Any]) -> None:
    """Build the real SamplingParams (strictly typed, as msgspec decodes it) with a row seed."""
    import msgspec
    from vllm.exceptions import VLLMError
    from vllm.sampling_params import SamplingParams

    known = {f.name for f in msgspec.structs.fields(SamplingParams) if not f.name.startswith("_")}
    for name in sampling:
        _check_sampling_name(str(name), known - set(vllm_mirror.NOT_FROM_JOB))
    try:
        msgspec.convert({**sampling, "seed": 0}, SamplingParams)
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$.")
        field = where.split("`")[0].split(".")[0].split("[")[0] or "?"
        raise JobError(f"sampling.{field}", text.replace("`", "").lower()) from None
    except (VLLMError, ValueError, TypeError) as exc:
        text = str(exc).split(" (parameter=")[0]
        field = getattr(exc, "parameter", None) or text.split(" ")[0]
        raise JobError(f"sampling.{field if field in known else '?'}", text) from None


# -- engine arguments -------------------------------------------------------------------------


def check_engine_args(args: Mapping[str, Any], where: str) -> None:
    """Keys vLLM's EngineArgs has, and the types of those hetbatch reads itself."""
    known = _engine_arg_names()
    for name, value in args.items():
        if name == "model":
            raise JobError(f"{where}.model", "set model.path instead")
        if name not in known:
            version = _installed_vllm() or vllm_mirror.VLLM_VERSION
            raise JobError(
                f"{where}.{name}",
                f"not an argument of vLLM {version}'s EngineArgs" + did_you_mean(name, known),
            )
        expected = vllm_mirror.ENGINE_ARG_TYPES.get(name)
        if expected and (isinstance(value, bool) or not isinstance(value, expected)):
            kinds = expected if isinstance(expected, tuple) else (expected,)
            wanted = " or ".join("an integer" if k is int else "a number" for k in kinds)
            raise JobError(f"{where}.{name}", f"expected {wanted}, got {value!r}")
        if name == "max_model_len" and value < 1:  # rows are dealt by the context it sets
            raise JobError(f"{where}.{name}", f"expected a positive number of tokens, got {value}")


def _engine_arg_names() -> frozenset[str]:
    if not _use_installed_vllm():
        return vllm_mirror.ENGINE_ARGS
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_"))


def _installed_vllm() -> str | None:
    from hetbatch.engines.vllm_engine import vllm_version

    return vllm_version()


def _use_installed_vllm() -> bool:
    """Ask vLLM itself only when it is installed and not the version the mirror copies."""
    installed = _installed_vllm()
    return installed is not None and installed != vllm_mirror.VLLM_VERSION


# -- accelerators -----------------------------------------------------------------------------


def check_accelerators(job: JobSpec) -> None:
    """Every pool's accelerator is in the catalog, or the job defines it in `accelerators`."""
    from hetbatch.errors import UserError
    from hetbatch.planner.catalog import DEFAULT_CATALOG

    try:
        catalog = DEFAULT_CATALOG.with_overrides(job.accelerators)
    except UserError as exc:
        raise JobError("accelerators", str(exc)) from None
    for i, pool in enumerate(job.cluster.pools):
        try:
            catalog.get(pool.accelerator)
        except UserError as exc:
            raise JobError(f"cluster.pools[{i}].accelerator", str(exc)) from None


# -- task ---------------------------------------------------------------------------------------

# Ways a checkpoint can carry a classifier vLLM will load: its own head, or one vLLM derives from
# the LM head's rows (hf_overrides).
_CLASSIFIER_KEYS = ("classifier_from_token", "method")
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_task_head(job: JobSpec) -> None:
    """`task: classify` on a generative checkpoint without a classification head would give
    scores from a layer vLLM creates but never loads (uninitialised memory, not a model):
    refuse it. Only a local folder can be checked; a hub name is left to vLLM."""
    if job.task != "classify":
        return
    config_file = Path(job.model.path).expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    overrides = job.model.engine_args.get("hf_overrides") or {}
    if any(key in config or key in overrides for key in _CLASSIFIER_KEYS):
        return
    architectures = config.get("architectures") or []
    if architectures and all(a.endswith(_GENERATIVE_SUFFIXES) for a in architectures):
        raise JobError(
            "task",
            f"classify needs a classification head; {config_file} is a generative checkpoint "
            f"({', '.join(architectures)}): use a *ForSequenceClassification checkpoint, or "
            "model.engine_args.hf_overrides with classifier_from_token",
        )
