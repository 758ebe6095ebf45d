"""Calibration: least squares recovers known coefficients; files round-trip."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hetbatch.errors import UserError
from hetbatch.planner import Coefficients, Measurement, fit_calibration
from hetbatch.planner.calibration import measurement_features
from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import DEFAULT_COEFFICIENTS, FITTED_FIELDS
from hetbatch.planner.profile import load_model_profile
from hetbatch.planning import load_calibration, save_calibration

TRUE = Coefficients(compute_eff=0.62, bandwidth_eff=0.81, comm_eff=0.45,
                    allreduce_latency_s=3.0e-5, step_overhead_s=1.2e-3, token_overhead_s=6e-6)


def _synthetic(acc_name: str, coef: Coefficients, tps: tuple[int, ...]) -> list[Measurement]:
    """Measurements as the model itself would time them with `coef`: prefill, decode steps and
    whole runs over a spread of batch sizes, lengths, models and TP sizes."""
    acc = get_accelerator(acc_name)
    out: list[Measurement] = []
    grid = itertools.product(("llama-3.1-8b", "llama-3.1-70b"), tps, (1, 8, 64, 256),
                             (128, 2048))
    for model, tp, batch, length in grid:
        if model.endswith("70b") and tp < 2:
            continue
        prof = load_model_profile(model)
        for kind in ("prefill_s", "decode_step_s", "output_tokens_per_s"):
            probe = Measurement(acc_name, model, tp, batch, length, 256, **{kind: 1.0})
            t = measurement_features(probe, prof, acc, coef).time(coef)
            value = batch * 256 / t if kind == "output_tokens_per_s" else t
            out.append(Measurement(acc_name, model, tp, batch, length, 256, **{kind: value}))
    return out


def test_fit_recovers_known_coefficients() -> None:
    cal = fit_calibration(_synthetic("H100", TRUE, (1, 2, 4, 8)))
    fitted = cal.coefficients_for("H100 SXM")
    assert fitted is not None
    for name in FITTED_FIELDS:
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=0.03), name
    assert cal.measurements["H100 SXM"] > 50


def test_unseen_terms_keep_their_defaults() -> None:
    cal = fit_calibration(_synthetic("A100", TRUE, (1,)))
    fitted = cal.coefficients_for("A100 80GB")
    assert fitted is not None
    assert fitted.compute_eff == pytest.approx(TRUE.compute_eff, rel=0.03)
    assert fitted.bandwidth_eff == pytest.approx(TRUE.bandwidth_eff, rel=0.03)
    assert fitted.comm_eff == pytest.approx(DEFAULT_COEFFICIENTS.comm_eff, rel=1e-3)
    assert fitted.allreduce_latency_s == pytest.approx(DEFAULT_COEFFICIENTS.allreduce_latency_s,
                                                       rel=1e-3)


def test_fit_tolerates_noise() -> None:
    ms = _synthetic("H100", TRUE, (1, 2, 4, 8))
    noisy = []
    for i, m in enumerate(ms):
        factor = 1.05 if i % 2 else 0.95
        field = next(k for k in ("prefill_s", "decode_step_s", "output_tokens_per_s")
                     if getattr(m, k) is not None)
        noisy.append(Measurement(**{**m.__dict__, field: getattr(m, field) * factor}))
    fitted = fit_calibration(noisy).coefficients_for("H100 SXM")
    assert fitted is not None
    assert fitted.compute_eff == pytest.approx(TRUE.compute_eff, rel=0.1)
    assert fitted.bandwidth_eff == pytest.approx(TRUE.bandwidth_eff, rel=0.1)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    cal = fit_calibration(_synthetic("H100", TRUE, (1, 2)))
    path = tmp_path / "calibration.json"
    save_calibration(cal, path)
    again = load_calibration(path)
    assert again.coefficients == cal.coefficients
    assert again.measurements == cal.measurements
    path.write_text("{}")
    with pytest.raises(UserError, match="calibration file"):
        load_calibration(path)


def test_measurement_records_are_checked() -> None:
    with pytest.raises(UserError, match="exactly one"):
        Measurement("H100", "llama-3.1-8b", 1, 8, 128, 128)
    with pytest.raises(UserError, match="num_requests"):
        Measurement("H100", "llama-3.1-8b", 1, 8, 128, 128, elapsed_s=10.0)
    with pytest.raises(UserError, match="unknown field"):
        Measurement.from_dict({"accelerator": "H100", "gpu_type": "x"})
    whole_run = Measurement("H100", "llama-3.1-8b", 1, 8, 128, 128, elapsed_s=10.0,
                            num_requests=80)
    assert fit_calibration([whole_run]).coefficients_for("H100 SXM") is not None
    with pytest.raises(UserError, match="unknown accelerator"):
        fit_calibration([Measurement("Z1", "llama-3.1-8b", 1, 8, 128, 128, prefill_s=1.0)])
