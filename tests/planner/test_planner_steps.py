"""How the prompts of a cycle fall into engine steps: whole, in the step after a sequence ends."""

from __future__ import annotations

import math

from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, cycle_features, step_work
from hetbatch.planner.profile import load_model_profile


def _h100(model: str) -> Deployment:
    return Deployment.uncalibrated(load_model_profile(model), get_accelerator("H100 SXM"))


def _evenly_spread(d: Deployment, batch: int, inp: float, out: float) -> float:
    """The cycle as if every step carried the same share of the prompts."""
    ctx = inp + out / 2
    return step_work(d, tokens=batch * (inp + out), out_tokens=batch * out, steps=out,
                     attended=batch * (inp * inp / 2 + out * ctx), kv_read=batch * out * ctx,
                     context=ctx).time(d.coefficients)


def test_whole_prompts_make_a_prompt_heavy_cycle_prefill_plus_decode() -> None:
    """A few long prompts and short outputs: the steps that carry a prompt are GEMM-bound and
    the others stream the weights, so the cycle costs about the sum of the two, not the larger
    (the even spread would hide the prompts under the weight streaming)."""
    d = _h100("qwen3-32b")
    batch, inp, out = 12, 2000, 100
    lumped = cycle_features(d, batch, 8192, inp, out).time(d.coefficients)
    even = _evenly_spread(d, batch, inp, out)
    decode_only = out * step_work(d, tokens=batch, out_tokens=batch, steps=1,
                                  attended=batch * (inp + out / 2), kv_read=batch * (inp + out / 2),
                                  context=inp + out / 2).time(d.coefficients)
    prompts = step_work(d, tokens=batch * inp, out_tokens=0, steps=1,
                        attended=batch * inp * inp / 2, kv_read=0.0,
                        context=inp).time(d.coefficients)
    assert lumped > 1.4 * even
    assert math.isclose(lumped, decode_only + prompts, rel_tol=0.2)


def test_gemm_bound_steps_are_unchanged_by_lumping() -> None:
    """When even a decode-only step is GEMM-bound, how the prompts fall does not matter."""
    d = _h100("llama-3.1-8b")
    batch, inp, out = 1024, 1000, 100
    lumped = cycle_features(d, batch, 16384, inp, out).time(d.coefficients)
    assert math.isclose(lumped, _evenly_spread(d, batch, inp, out), rel_tol=1e-6)


def test_prefill_bound_cycles_fill_every_step() -> None:
    """Prompts beyond the decode steps' spare budget: every step is full, as before."""
    d = _h100("llama-3.1-8b")
    batch, inp, out = 256, 4000, 4
    steps = math.ceil(batch * (inp + out) / 2048)
    lumped = cycle_features(d, batch, 2048, inp, out)
    assert lumped.steps == steps


def test_lumped_cycle_keeps_its_token_counts() -> None:
    """The Poisson mixture sums to the cycle's work: as many steps as output tokens and every
    output token sampled once."""
    d = _h100("qwen3-14b")
    f = cycle_features(d, 40, 8192, 3000, 200)
    assert math.isclose(f.steps, 200, rel_tol=1e-9)
    assert math.isclose(f.tokens, 40 * 200, rel_tol=1e-9)


def test_gemm_peaks_follow_the_measured_achievable_matmul_flops() -> None:
    """An A100's best BF16 matmul reaches 86.9% of its datasheet, an H100's 80.3%: the model's
    GEMM peaks keep that ratio (parts without a measurement keep their datasheet ratio)."""
    from hetbatch.planner.model import compute_peak_tflops

    a100, h100 = get_accelerator("A100 80GB"), get_accelerator("H100 SXM")
    ratio = compute_peak_tflops(a100, "bf16") / compute_peak_tflops(h100, "bf16")
    assert math.isclose(ratio, (312 * 0.869) / (989 * 0.803), rel_tol=1e-6)
    l40s = get_accelerator("L40S")
    assert math.isclose(compute_peak_tflops(l40s, "fp8") / compute_peak_tflops(h100, "fp8"),
                        733 / 1979, rel_tol=1e-6)
