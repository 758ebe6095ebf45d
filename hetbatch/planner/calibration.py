"""Calibration: per-accelerator coefficients fitted by least squares from measurements.

A short profiling run on real hardware yields `Measurement` records (prefill times, decode step
times or whole-run throughput at known batch sizes and lengths). Each record is one linear
equation `measured time = features . coefficients` of the throughput model, so the coefficients
of an accelerator are a least-squares solution. The roofline choice inside a step depends on the
coefficients, so the fit alternates choice and solve until they agree (a few rounds).

Unknowns are fitted as multipliers of the defaults with a weak pull toward 1, so that a term the
measurements cannot see (e.g. communication when every run used TP=1) keeps its default rather
than drifting to an arbitrary value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from typing import Any

import numpy as np

from hetbatch.errors import UserError
from hetbatch.planner.catalog import DEFAULT_CATALOG, Accelerator, Catalog
from hetbatch.planner.model import (
    Coefficients,
    Deployment,
    TimeFeatures,
    cycle_features,
    decode_step_features,
    default_coefficients,
    prefill_features,
)
from hetbatch.planner.profile import ModelProfile, load_model_profile

PRIOR_WEIGHT = 1e-3
ROUNDS = 12


@dataclass(frozen=True)
class Measurement:
    """One timed run of a model on one accelerator type.

    Give exactly one of: `prefill_s` (time to prefill `concurrency` prompts of `input_len`),
    `decode_step_s` (mean time of one decode step of `concurrency` sequences holding
    `input_len + output_len / 2` tokens), `output_tokens_per_s` (steady generation throughput
    with `concurrency` sequences in flight), or `elapsed_s` with `num_requests` (wall time of a
    whole run of that many requests at that concurrency).
    """

    accelerator: str
    model: str
    tensor_parallel_size: int
    concurrency: int
    input_len: float
    output_len: float
    quantization: str | None = None
    pipeline_parallel_size: int = 1
    max_num_batched_tokens: int = 8192
    prefill_s: float | None = None
    decode_step_s: float | None = None
    output_tokens_per_s: float | None = None
    elapsed_s: float | None = None
    num_requests: int | None = None

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.prefill_s, self.decode_step_s,
                                         self.output_tokens_per_s, self.elapsed_s)]
        if sum(given) != 1:
            raise UserError("a measurement needs exactly one of prefill_s, decode_step_s, "
                            "output_tokens_per_s, elapsed_s")
        if self.elapsed_s is not None and not self.num_requests:
            raise UserError("a measurement with elapsed_s needs num_requests")
        if self.concurrency < 1 or self.tensor_parallel_size < 1:
            raise UserError("a measurement needs concurrency >= 1 and tensor_parallel_size >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"measurement has unknown field(s) {sorted(unknown)}")
        return cls(**dict(data))


def measured_time(m: Measurement) -> float:
    """The time the record's features must add up to."""
    if m.prefill_s is not None:
        return m.prefill_s
    if m.decode_step_s is not None:
        return m.decode_step_s
    if m.output_tokens_per_s is not None:
        return m.concurrency * m.output_len / m.output_tokens_per_s
    assert m.elapsed_s is not None and m.num_requests
    return m.elapsed_s * m.concurrency / m.num_requests


def measurement_features(
    m: Measurement, model: ModelProfile, acc: Accelerator, coef: Coefficients
) -> TimeFeatures:
    """The record's physical work on the deployment it ran on, judged with `coef`."""
    d = Deployment(model, acc, coef, m.tensor_parallel_size, m.pipeline_parallel_size)
    b = m.concurrency
    if m.prefill_s is not None:
        return prefill_features(d, b, m.input_len, m.max_num_batched_tokens)
    if m.decode_step_s is not None:
        return decode_step_features(d, b, m.input_len + m.output_len / 2)
    return cycle_features(d, b, m.max_num_batched_tokens, m.input_len, m.output_len)


@dataclass(frozen=True)
class Calibration:
    """Fitted coefficients per accelerator name (canonical catalog names)."""

    coefficients: Mapping[str, Coefficients] = field(default_factory=dict)
    measurements: Mapping[str, int] = field(default_factory=dict)

    def coefficients_for(self, accelerator: str) -> Coefficients | None:
        return self.coefficients.get(accelerator)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "accelerators": {
                name: {**asdict(c), "measurements": self.measurements.get(name, 0)}
                for name, c in sorted(self.coefficients.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("version") != 1 or not isinstance(data.get("accelerators"), dict):
            raise UserError("calibration file: expected {'version': 1, 'accelerators': {...}}")
        coefs: dict[str, Coefficients] = {}
        counts: dict[str, int] = {}
        names = {f.name for f in fields(Coefficients)}
        for acc, values in data["accelerators"].items():
            counts[acc] = int(values.get("measurements", 0))
            try:
                coefs[acc] = Coefficients(**{k: float(v) for k, v in values.items() if k in names})
            except (TypeError, ValueError) as exc:
                raise UserError(f"calibration file: bad coefficients for {acc!r}: {exc}") from exc
        return cls(coefs, counts)


def coefficients_or_default(acc: Accelerator, calibration: Calibration | None) -> Coefficients:
    """The accelerator's coefficients fitted in `calibration`, else its uncalibrated defaults."""
    fitted = calibration.coefficients_for(acc.name) if calibration is not None else None
    return fitted or default_coefficients(acc)


def fit_calibration(
    measurements: Iterable[Measurement],
    catalog: Catalog | None = None,
    profiles: Mapping[str, ModelProfile] | None = None,
    base: Calibration | None = None,
) -> Calibration:
    """Fit coefficients per accelerator from measurements (at least one per accelerator).

    `profiles` maps a measurement's model string to a profile, for models that are neither
    built in nor a readable path; `base` supplies starting coefficients (defaults otherwise).
    """
    catalog = catalog or DEFAULT_CATALOG
    groups: dict[str, list[Measurement]] = {}
    accs: dict[str, Accelerator] = {}
    for m in measurements:
        acc = catalog.get(m.accelerator)
        accs[acc.name] = acc
        groups.setdefault(acc.name, []).append(m)
    if not groups:
        raise UserError("calibration needs at least one measurement")
    loader = _profile_loader(profiles or {})
    coefs: dict[str, Coefficients] = {}
    for name, ms in sorted(groups.items()):
        coefs[name] = fit_accelerator(ms, accs[name], coefficients_or_default(accs[name], base),
                                      loader)
    return Calibration(coefs, {k: len(v) for k, v in groups.items()})


def _profile_loader(
    profiles: Mapping[str, ModelProfile],
) -> Callable[[str, str | None], ModelProfile]:
    cache: dict[tuple[str, str | None], ModelProfile] = {}

    def load(name: str, quantization: str | None) -> ModelProfile:
        key = (name, quantization)
        if key not in cache:
            if name in profiles:
                prof = profiles[name]
                if quantization and quantization != prof.quantization:
                    prof = replace(prof, quantization=quantization)
                cache[key] = prof
            else:
                cache[key] = load_model_profile(name, quantization)
        return cache[key]

    return load


def fit_accelerator(
    ms: Sequence[Measurement], acc: Accelerator, start: Coefficients,
    load: Callable[[str, str | None], ModelProfile],
) -> Coefficients:
    """Least squares on relative error, alternating the roofline choice and the solve."""
    models = [load(m.model, m.quantization) for m in ms]
    times = np.array([measured_time(m) for m in ms], dtype=float)
    if np.any(times <= 0):
        raise UserError(f"calibration for {acc.name}: measured times must be positive")
    base = np.array(start.vector(), dtype=float)
    coef = start
    for _ in range(ROUNDS):
        feats = np.array([astuple(measurement_features(m, p, acc, coef))
                          for m, p in zip(ms, models, strict=True)], dtype=float)
        scale = _solve(feats * base / times[:, None])
        new = Coefficients.from_vector(tuple(base * scale), start)
        if np.allclose(new.vector(), coef.vector(), rtol=1e-6):
            coef = new
            break
        coef = new
    return coef


def _solve(a: np.ndarray) -> np.ndarray:
    """Multipliers s >= small with a @ s ~ 1, weakly pulled toward 1; a column that lands at a
    non-positive value is pinned at 1 (its default) and the rest solved again."""
    n = a.shape[1]
    free = np.ones(n, dtype=bool)
    s = np.ones(n)
    for _ in range(n):
        rhs = np.ones(a.shape[0]) - a[:, ~free] @ s[~free]
        lhs = np.vstack([a[:, free], PRIOR_WEIGHT * np.eye(int(free.sum()))])
        target = np.concatenate([rhs, PRIOR_WEIGHT * np.ones(int(free.sum()))])
        sol, *_ = np.linalg.lstsq(lhs, target, rcond=None)
        s[free] = sol
        bad = free & (s <= 1e-3)
        if not bad.any():
            break
        s[bad] = 1.0
        free &= ~bad
    return s

