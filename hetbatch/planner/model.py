"""Throughput and memory model of one vLLM instance.

Memory: each device holds its share of the weights, a fixed reserve (CUDA context, graphs,
communication buffers), the activation peak of one scheduling step, and the KV cache in what is
left; the KV cache caps how many sequences run at once.

Time: a batch of B sequences is followed from admission to completion under continuous batching
with chunked prefill (vLLM's default). Its time is a sum of terms, each a physical quantity at
the datasheet peak multiplied by a coefficient:

    time = max(GEMM flops/peak / compute_eff, weight bytes/bandwidth / bandwidth_eff)
         + attention flops/peak / compute_eff + KV bytes/bandwidth / bandwidth_eff
         + allreduce bytes/interconnect / comm_eff + allreduces * allreduce_latency
         + steps * step_overhead + generated tokens * token_overhead

Within a step the GEMMs and the streaming of the weights are the same kernels, so only the
slower of the two counts (a roofline); everything else runs one after another and adds up. Once
that choice is made the time is linear in the coefficients, which is what lets
`calibration.fit_calibration` fit them by least squares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from hetbatch.planner.catalog import Accelerator
from hetbatch.planner.profile import QUANTIZED, ModelProfile

GIB = 2**30
BLOCK_TOKENS = 16  # vLLM's KV block size; the average sequence wastes half a block


@dataclass(frozen=True)
class Coefficients:
    """Efficiency factors of the time model; the first six are fitted by calibration.

    Defaults are datasheet-relative and justified per field:
    - compute_eff: large bf16 GEMMs reach 60-75% of dense peak; attention, norms and the
      ragged shapes of mixed prefill/decode batches pull the whole forward pass lower. Stated
      on the H100 SXM; parts whose best matmul reaches another share of their datasheet
      (`Accelerator.matmul_fraction`, measured) scale it by that ratio.
    - bandwidth_eff: streaming kernels reach 80-90% of HBM peak; decode GEMV/attention kernels
      in serving engines sit lower, around two thirds.
    - comm_eff: NCCL/custom allreduce on small messages reaches a fraction of link peak,
      and the link figures quoted are bidirectional.
    - allreduce_latency_s: one small allreduce costs ~10-30 us on NVLink.
    - step_overhead_s: scheduling, input preparation and launch per engine step (~1-3 ms in
      vLLM with CUDA graphs).
    - token_overhead_s: per generated token work on the host (sampling, detokenising, output).
    """

    compute_eff: float = 0.5
    bandwidth_eff: float = 0.65
    comm_eff: float = 0.35
    allreduce_latency_s: float = 2.5e-5
    step_overhead_s: float = 2.0e-3
    token_overhead_s: float = 1.0e-5
    # Not fitted: memory reserve outside weights, activations and KV (context, graphs, NCCL).
    reserve_gib: float = 1.0
    # Not fitted: inter-node link for pipeline parallelism (200 Gb/s InfiniBand).
    internode_gbps: float = 25.0
    # Not fitted: pipeline bubbles and stage imbalance lose this fraction per extra stage.
    pp_loss_per_stage: float = 0.08

    def vector(self) -> tuple[float, ...]:
        """The fitted coefficients as multipliers of `TimeFeatures` (efficiencies inverted)."""
        return (
            1.0 / self.compute_eff, 1.0 / self.bandwidth_eff, 1.0 / self.comm_eff,
            self.allreduce_latency_s, self.step_overhead_s, self.token_overhead_s,
        )

    @classmethod
    def from_vector(cls, vec: tuple[float, ...], base: Coefficients) -> Coefficients:
        return cls(
            compute_eff=1.0 / vec[0], bandwidth_eff=1.0 / vec[1], comm_eff=1.0 / vec[2],
            allreduce_latency_s=vec[3], step_overhead_s=vec[4], token_overhead_s=vec[5],
            reserve_gib=base.reserve_gib, internode_gbps=base.internode_gbps,
            pp_loss_per_stage=base.pp_loss_per_stage,
        )


FITTED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Coefficients))[:6]

DEFAULT_COEFFICIENTS = Coefficients()
# Host CPUs: GEMMs reach a small part of AVX/AMX peak in vLLM's CPU backend, steps cost more.
CPU_COEFFICIENTS = Coefficients(
    compute_eff=0.3, bandwidth_eff=0.5, comm_eff=0.3, step_overhead_s=5e-3,
    token_overhead_s=5e-5, reserve_gib=0.5,
)


def default_coefficients(acc: Accelerator) -> Coefficients:
    return CPU_COEFFICIENTS if acc.kind == "cpu" else DEFAULT_COEFFICIENTS


@dataclass(frozen=True)
class Deployment:
    """One instance as the time and memory model sees it: the model, under its weight format,
    split over `tp` x `pp` devices of one accelerator type, priced with `coefficients`.

    (`DeployConfig` is what the search chooses for a pool: this plus the vLLM limits.)
    """

    model: ModelProfile
    accelerator: Accelerator
    coefficients: Coefficients
    tp: int = 1
    pp: int = 1

    @classmethod
    def uncalibrated(
        cls, model: ModelProfile, accelerator: Accelerator, tp: int = 1, pp: int = 1
    ) -> Deployment:
        """With the accelerator's default coefficients."""
        return cls(model, accelerator, default_coefficients(accelerator), tp, pp)

    @property
    def devices(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class TimeFeatures:
    """Physical quantities of one batch cycle, each in seconds at 100% of the datasheet figure
    (or counts); the cycle time is their dot product with `Coefficients.vector()`."""

    compute_s: float
    memory_s: float
    comm_s: float
    allreduces: float
    steps: float
    tokens: float

    def values(self) -> tuple[float, ...]:
        """The fields in order (dataclasses.astuple deep-copies, which the search cannot afford)."""
        return (self.compute_s, self.memory_s, self.comm_s, self.allreduces, self.steps,
                self.tokens)

    def time(self, coef: Coefficients) -> float:
        return sum(f * c for f, c in zip(self.values(), coef.vector(), strict=True))

    def bound(self, coef: Coefficients) -> str:
        parts = [f * c for f, c in zip(self.values(), coef.vector(), strict=True)]
        named = {
            "compute": parts[0], "memory": parts[1], "communication": parts[2] + parts[3],
            "overhead": parts[4] + parts[5],
        }
        return max(named, key=lambda k: named[k])


@dataclass(frozen=True)
class MemoryFit:
    """Per-device memory budget of one configuration; kv_tokens < 0 means it does not fit."""

    usable_gib: float
    weights_gib: float
    activation_gib: float
    reserve_gib: float
    kv_tokens: int

    @property
    def kv_gib(self) -> float:
        return self.usable_gib - self.weights_gib - self.activation_gib - self.reserve_gib


def compute_peak_tflops(acc: Accelerator, quantization: str) -> float:
    """Peak of the GEMMs for a weight format: FP8/INT8 run at their own rate where supported;
    weight-only int4 dequantizes to 16-bit, so it runs at the bf16 rate."""
    if quantization == "fp8" and acc.fp8_tflops:
        return acc.fp8_tflops * acc.compute_scale
    if quantization == "int8" and acc.int8_tops:
        return acc.int8_tops * acc.compute_scale
    return acc.bf16_tflops * acc.compute_scale


def kv_bytes_per_token_per_device(d: Deployment, context: float | None = None) -> float:
    """KV heads split over TP ranks (replicated once TP exceeds them; a latent-attention cache
    is whole on every rank), layers over PP stages; windowed layers count for what a token
    holds in a sequence of `context` tokens (None: the full-length worst case)."""
    model = d.model
    if model.kv_latent:
        per_layer = float(model.kv_latent)
    else:
        per_layer = 2 * max(1.0, model.kv_heads / d.tp) * model.head_dim
    return model.kv_layers_at(context) / d.pp * per_layer * model.kv_dtype_bytes


def kv_capacity(d: Deployment, fit: MemoryFit, context: float | None) -> int:
    """Tokens the KV cache holds in sequences of `context` tokens (-1 when nothing fits)."""
    if fit.kv_gib <= 0:
        return -1
    return int(fit.kv_gib * GIB / kv_bytes_per_token_per_device(d, context))


def activation_bytes(d: Deployment, max_num_seqs: int, max_tokens: int) -> float:
    """Peak activations: a forward of max_tokens tokens (hidden buffers and the MLP
    intermediate), or the sampler's float32 logits and probabilities for max_num_seqs
    sequences, whichever is larger; the sampler runs after the forward has freed its buffers."""
    per_token = 8 * d.model.hidden + 4 * d.model.intermediate / d.tp
    logits = 2 * 4 * max_num_seqs * d.model.vocab
    return max(max_tokens * per_token, logits)


def memory_fit(
    d: Deployment, max_num_seqs: int, max_num_batched_tokens: int,
    gpu_memory_utilization: float,
) -> MemoryFit:
    reserve = d.coefficients.reserve_gib
    usable = d.accelerator.memory_gib * gpu_memory_utilization
    weights = d.model.weight_bytes / d.devices / GIB
    act = activation_bytes(d, max_num_seqs, max_num_batched_tokens) / GIB
    kv_gib = usable - weights - act - reserve
    per_token = kv_bytes_per_token_per_device(d)
    kv_tokens = int(kv_gib * GIB / per_token) if kv_gib > 0 else -1
    return MemoryFit(usable, weights, act, reserve, kv_tokens)


def steady_concurrency(
    kv_tokens: int, max_num_seqs: int, input_len: float, output_len: float
) -> int:
    """Sequences that fit at once: in steady state a sequence holds its prompt and, on average,
    half its output, plus half a block of slack."""
    footprint = input_len + output_len / 2 + BLOCK_TOKENS / 2
    return max(0, min(max_num_seqs, int(kv_tokens / footprint)))


def weight_bytes_touched(model: ModelProfile, tokens_per_step: float) -> float:
    """Weights read in one step: all dense weights, and for MoE the experts that the step's
    tokens route to (expected distinct experts out of num_experts at top-k routing)."""
    if not model.is_moe:
        return model.weight_bytes
    share = 1.0 - (1.0 - model.experts_per_tok / model.num_experts) ** max(1.0, tokens_per_step)
    expert_bytes = model.expert_params * model.weight_bytes_per_param
    return model.weight_bytes - expert_bytes * (1.0 - share)


def cycle_features(
    d: Deployment, batch: int, max_num_batched_tokens: int, input_len: float, output_len: float
) -> TimeFeatures:
    """Physical work of taking `batch` sequences from admission to their last token.

    There are at least as many steps as output tokens, more when the prompts do not fit in the
    spare token budget of the decode steps (then every step is full and they are alike).
    Otherwise the prompts do not spread evenly over the steps: vLLM's scheduler gives a step's
    spare budget to the waiting prompts that fit, so a prompt is prefilled whole (up to the
    budget) in the step after a sequence finishes and frees its place. A step therefore carries
    the decodes of the batch plus the prompts of the k sequences that finished before it, k
    Poisson with mean batch / output_len, and each step is its own roofline: decode-only steps
    stream the weights, steps with a prompt are bound by its GEMMs (`_lumped_steps`).
    """
    tokens = batch * (input_len + output_len)
    ctx = input_len + output_len / 2
    full_steps = math.ceil(tokens / max_num_batched_tokens)
    if full_steps >= output_len or input_len <= 0:
        return step_work(
            d, tokens=tokens, out_tokens=batch * output_len,
            steps=max(output_len, full_steps),
            attended=batch * (input_len * input_len / 2 + output_len * ctx),
            kv_read=batch * output_len * ctx, context=ctx,
        )
    return _lumped_steps(d, batch, input_len, output_len, ctx)


# Poisson tail mass below which the remaining prompt counts are folded into one term.
_POISSON_TAIL = 1e-3


def _lumped_steps(
    d: Deployment, batch: int, input_len: float, output_len: float, ctx: float
) -> TimeFeatures:
    """`output_len` steps, each `batch` decodes plus k whole prompts (k Poisson, mean
    batch / output_len), summed with their probabilities. Steps with more prompts are ever more
    GEMM-bound and their work is linear in k from there on, so the tail beyond the first
    compute-bound count is one term at its conditional mean (exact for the roofline)."""
    lam = batch / output_len

    def one_step(k: float) -> TimeFeatures:
        return step_work(
            d, tokens=batch + k * input_len, out_tokens=batch, steps=1,
            attended=batch * ctx + k * input_len * input_len / 2,
            kv_read=batch * ctx, context=ctx,
        )

    acc = [0.0] * 6
    p = math.exp(-lam)
    mass, mean_mass, k = 0.0, 0.0, 0
    while True:
        tail, tail_mean = 1.0 - mass, lam - mean_mass  # P(K >= k), E[K; K >= k]
        last = (tail < _POISSON_TAIL or k > 4 * lam + 10
                or _gemm_bound(d, batch + k * input_len, batch))
        f = one_step(tail_mean / tail if last and tail > 1e-12 else k)
        weight = tail if last else p
        for i, v in enumerate(f.values()):
            acc[i] += weight * v
        if last:
            break
        mass += p
        mean_mass += k * p
        k += 1
        p *= lam / k
    return TimeFeatures(*(output_len * v for v in acc))


def _gemm_bound(d: Deployment, tokens: float, out_tokens: float) -> bool:
    """Whether every GEMM roofline of a step of `tokens` tokens is on its compute side (then
    more tokens only add GEMM time: the step is linear in its tokens)."""
    coef = d.coefficients
    return all(g / coef.compute_eff >= w / coef.bandwidth_eff
               for g, w in _gemm_parts(d, tokens, out_tokens, 1, tokens))


def decode_step_features(d: Deployment, batch: int, context: float) -> TimeFeatures:
    """One decode step of `batch` sequences that each hold `context` tokens."""
    return step_work(d, tokens=batch, out_tokens=batch, steps=1, attended=batch * context,
                     kv_read=batch * context, context=context)


def prefill_features(
    d: Deployment, batch: int, input_len: float, max_num_batched_tokens: int
) -> TimeFeatures:
    """Prefill of `batch` prompts of `input_len` tokens in chunks of max_num_batched_tokens."""
    tokens = batch * input_len
    return step_work(d, tokens=tokens, out_tokens=0,
                     steps=math.ceil(tokens / max_num_batched_tokens),
                     attended=batch * input_len * input_len / 2, kv_read=0.0,
                     context=input_len)


def step_work(
    d: Deployment, *, tokens: float, out_tokens: float, steps: float, attended: float,
    kv_read: float, context: float | None = None,
) -> TimeFeatures:
    """Work of `steps` alike engine steps processing `tokens` tokens, `out_tokens` of which are
    sampled, with `attended` query-key pairs and `kv_read` token contexts read from the cache,
    in sequences of about `context` tokens (windowed layers attend to their window only).

    Each step runs the GEMMs of its tokens while streaming the weights once (the same kernels,
    so the slower of the two counts, judged with the coefficients; an MoE's routed experts,
    which see only their share of the tokens, are their own such roofline), then attention, the
    allreduces and host work, which follow one another and add up.
    """
    model, acc, coef, tp, pp = d.model, d.accelerator, d.coefficients, d.tp, d.pp
    devices = d.devices
    layers = model.layers
    bandwidth = acc.memory_bw_gbps * 1e9 * acc.peak_fraction
    per_step = tokens / steps if steps else 0.0
    compute_s, memory_s = 0.0, 0.0
    for gemm_s, weights_s in _gemm_parts(d, tokens, out_tokens, steps, per_step):
        if gemm_s / coef.compute_eff >= weights_s / coef.bandwidth_eff:
            compute_s += gemm_s
        else:
            memory_s += weights_s
    attn_layers = model.kv_layers_at(context)
    attn_flops = 4 * attn_layers * model.heads * (model.attn_dim or model.head_dim) * attended
    compute_s += attn_flops / devices / (acc.bf16_tflops * acc.compute_scale * 1e12)
    memory_s += kv_read * kv_bytes_per_token_per_device(d, context) / bandwidth

    comm_s, allreduces = 0.0, 0.0
    if tp > 1:
        ar_bytes = 2 * layers / pp * tokens * model.hidden * 2 * 2 * (tp - 1) / tp
        comm_s = ar_bytes / (acc.tp_link_gbps(tp) * 1e9)
        allreduces = steps * 2 * layers / pp * allreduce_latency_units(acc, tp)
    if pp > 1:
        comm_s += (pp - 1) * tokens * model.hidden * 2 / (coef.internode_gbps * 1e9) / pp
    return TimeFeatures(compute_s, memory_s, comm_s, allreduces, float(steps), float(out_tokens))


def _gemm_parts(
    d: Deployment, tokens: float, out_tokens: float, steps: float, per_step: float
) -> list[tuple[float, float]]:
    """(GEMM seconds, weight-streaming seconds) at datasheet peaks for the dense weights and,
    for an MoE, for the routed experts the step's tokens reach."""
    model, acc = d.model, d.accelerator
    head = model.vocab * model.hidden
    routed_active = model.expert_params * model.experts_per_tok / max(model.num_experts, 1)
    dense_linear = model.active_params - head * (1 if model.tie_embeddings else 2) - routed_active
    peak = compute_peak_tflops(acc, model.quantization) * 1e12
    head_peak = (acc.bf16_tflops * acc.compute_scale * 1e12 if model.quantization in QUANTIZED
                 else peak)  # the LM head stays 16-bit
    bandwidth = acc.memory_bw_gbps * 1e9 * acc.peak_fraction * d.devices
    expert_bytes = model.expert_params * model.weight_bytes_per_param
    dense_gemm = (2 * dense_linear * tokens / peak + 2 * head * out_tokens / head_peak) / d.devices
    dense_bytes = model.weight_bytes - expert_bytes
    parts = [(dense_gemm, steps * dense_bytes / bandwidth)]
    if model.is_moe:
        touched = weight_bytes_touched(model, per_step) - dense_bytes
        parts.append((2 * routed_active * tokens / peak / d.devices, steps * touched / bandwidth))
    return parts


def allreduce_latency_units(acc: Accelerator, tp: int) -> float:
    """Latency of one allreduce in units of a one-shot one: vLLM's custom allreduce reaches
    every peer at once where all pairs are linked (or between two PCIe devices); beyond two
    PCIe devices NCCL's ring takes tp - 1 hops each way, about half a one-shot each."""
    if acc.one_shot_allreduce or tp <= 2:
        return 1.0
    return (tp - 1) / 2


@dataclass(frozen=True)
class InstanceEstimate:
    output_tokens_per_s: float
    total_tokens_per_s: float
    cycle_s: float
    bound: str


def estimate_instance(
    d: Deployment, batch: int, max_num_batched_tokens: int, input_len: float, output_len: float
) -> InstanceEstimate:
    """Tokens/s of one instance running `batch` sequences at a time."""
    coef = d.coefficients
    feats = cycle_features(d, batch, max_num_batched_tokens, input_len, output_len)
    cycle = feats.time(coef) * (1.0 + coef.pp_loss_per_stage * (d.pp - 1))
    out = batch * output_len / cycle
    return InstanceEstimate(out, out * (input_len + output_len) / output_len, cycle,
                            feats.bound(coef))


def predict(
    d: Deployment, input_len: float, output_len: float, *, max_num_seqs: int = 256,
    max_num_batched_tokens: int = 8192, gpu_memory_utilization: float = 0.9,
) -> tuple[InstanceEstimate, int]:
    """Estimate one instance at the concurrency its KV cache allows; returns it and that
    concurrency (0 and a zero estimate when nothing fits)."""
    fit = memory_fit(d, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization)
    tokens = kv_capacity(d, fit, input_len + output_len / 2)
    batch = steady_concurrency(tokens, max_num_seqs, input_len, output_len)
    if batch < 1:
        return InstanceEstimate(0.0, 0.0, math.inf, "memory"), 0
    est = estimate_instance(d, batch, max_num_batched_tokens, input_len, output_len)
    return est, batch


def prompt_token_cost(
    d: Deployment, batch: int, max_num_batched_tokens: int, input_len: float, output_len: float
) -> float:
    """What one prompt token costs in output tokens at this operating point: the marginal cycle
    time of a longer prompt over that of a longer output. A row's work is then
    `output + cost * input`, so rows of other lengths than the mean are priced alike."""
    base = cycle_features(d, batch, max_num_batched_tokens, input_len, output_len)
    t0 = base.time(d.coefficients)
    step_in, step_out = max(1.0, 0.1 * input_len), max(1.0, 0.1 * output_len)
    longer_in = cycle_features(d, batch, max_num_batched_tokens, input_len + step_in,
                               output_len).time(d.coefficients)
    longer_out = cycle_features(d, batch, max_num_batched_tokens, input_len,
                                output_len + step_out).time(d.coefficients)
    per_out = max(longer_out - t0, 1e-12) / step_out
    return max(0.0, (longer_in - t0) / step_in / per_out)


def drain_step_s(d: Deployment, concurrency: int, context: float) -> float:
    """Decode step time while an instance drains its last requests. The batch falls from the
    concurrency toward one roughly geometrically, so a long last request spends about as many
    steps in each halving of the batch: the step at the geometric middle stands for them."""
    batch = max(1, round(math.sqrt(max(concurrency, 1))))
    step = decode_step_features(d, batch, context).time(d.coefficients)
    return step * (1.0 + d.coefficients.pp_loss_per_stage * (d.pp - 1))
