"""The mirror of vLLM's SamplingParams and EngineArgs agrees with the real classes, so that the
checks made where vLLM is not installed give the verdicts vLLM would."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from hetbatch import vllm_mirror
from hetbatch.engines.vllm_engine import vllm_version
from hetbatch.validate import JobError, _check_sampling_with_mirror, _check_sampling_with_vllm

msgspec = pytest.importorskip("msgspec")
pytest.importorskip("vllm")

# Values of every kind a YAML file can give, on and around each field's limits.
VALUES = [
    None, True, False, 0, 1, 2, 3, -1, -2, 16, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, -0.5, -2.5,
    float("nan"), float("inf"), "", "x", "ten", [], ["a"], [""], [1, 2], [[1, 2]], {}, {"a": 1},
    {1: 0.5}, {"1": 0.5}, {"json": {"type": "object"}}, {"regex": "a+", "choice": ["a"]},
    {"max_pattern_size": 4, "min_count": 1}, {"max_pattern_size": 4, "min_count": 3},
]


def _verdict(check, sampling) -> bool:
    try:
        check(sampling)
    except JobError:
        return False
    return True


def test_mirror_is_the_installed_vllm() -> None:
    assert vllm_version() == vllm_mirror.VLLM_VERSION, (
        "vLLM was upgraded: update hetbatch/vllm_mirror.py (this test lists what differs)"
    )


def test_sampling_fields_are_vllms() -> None:
    from vllm.sampling_params import SamplingParams

    real = {f.name for f in msgspec.structs.fields(SamplingParams) if not f.name.startswith("_")}
    mirrored = set(vllm_mirror.SamplingParamsMirror.model_fields) | set(vllm_mirror.NOT_FROM_JOB)
    assert mirrored == real, (sorted(real - mirrored), sorted(mirrored - real))


def test_engine_args_are_vllms() -> None:
    from vllm.engine.arg_utils import EngineArgs

    real = {f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")}
    assert real == vllm_mirror.ENGINE_ARGS, (
        sorted(real - vllm_mirror.ENGINE_ARGS), sorted(vllm_mirror.ENGINE_ARGS - real)
    )


@pytest.mark.parametrize("field", sorted(vllm_mirror.SamplingParamsMirror.model_fields))
def test_same_verdict_on_every_value(field: str) -> None:
    disagree = []
    for value in VALUES:
        sampling = {field: value}
        mirror = _verdict(_check_sampling_with_mirror, sampling)
        real = _verdict(_check_sampling_with_vllm, sampling)
        if mirror != real:
            disagree.append((value, "mirror" if mirror else "vllm", "accepts"))
    assert not disagree, disagree


@pytest.mark.parametrize(
    ("a", "b"),
    list(itertools.combinations(["max_tokens", "min_tokens", "stop", "detokenize", "n",
                                 "temperature", "bad_words"], 2)),
)
def test_same_verdict_between_fields(a: str, b: str) -> None:
    values = [None, 0, 1, 2, 5, 0.0, True, False, "x", [""], ["s"]]
    for va, vb in itertools.product(values, values):
        sampling = {a: va, b: vb}
        assert _verdict(_check_sampling_with_mirror, sampling) == _verdict(
            _check_sampling_with_vllm, sampling
        ), sampling
