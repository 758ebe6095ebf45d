"""Accelerator catalog: the datasheet figures the throughput model starts from.

Figures are per device as the runtime sees it (one GPU, one NPU, one MI250X GCD). Memory is the
capacity the driver reports where it differs from the marketed one (GDDR6 cards with ECC, and
H100's 81,559 MiB). Throughput
figures are dense (no sparsity). Interconnect is the vendor's headline intra-node figure
(bidirectional where the datasheet gives it so); the model's communication efficiency absorbs
the difference. A job file can add types or override figures through `with_overrides`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from hetbatch.errors import UserError


@dataclass(frozen=True)
class Accelerator:
    """One accelerator type. `fp8_tflops`/`int8_tops` are None where the hardware lacks them."""

    name: str
    memory_gib: float
    memory_bw_gbps: float
    bf16_tflops: float
    interconnect_gbps: float
    fp8_tflops: float | None = None
    int8_tops: float | None = None
    bf16: bool = True
    kind: str = "gpu"  # gpu | npu | cpu: selects default efficiency coefficients
    # Share of the datasheet peaks the vendor's kernels reach, relative to NVIDIA's CUDA stack
    # (1.0). It scales compute and bandwidth alike before the model's efficiency coefficients.
    peak_fraction: float = 1.0
    # Maximum achievable matmul FLOPS (the best BF16 matmul torch reaches, as a share of the
    # datasheet peak) relative to the H100 SXM's 80.3%, on which the default compute
    # efficiency is stated. Measured MAMF (S. Bekman, "Machine Learning Engineering",
    # compute/accelerator, Maximum Achievable Matmul FLOPS comparison table): A100 SXM 86.9%,
    # A100 PCIe 81.1%, H100 SXM 80.3% (H200 the same). 1.0 where no measurement is published.
    matmul_fraction: float = 1.0
    source: str = ""
    # How the devices of a node talk: "nvlink" (all-to-all through NVSwitch, or any fabric that
    # connects every pair: Infinity Fabric, HCCS, RoCE) or "pcie". On PCIe, `link_group` devices
    # share a switch at `interconnect_gbps`; TP beyond a group crosses the CPUs' socket link at
    # `cross_group_gbps`, and vLLM's one-shot custom allreduce is off beyond two devices, so
    # NCCL's ring pays a latency per hop.
    link: str = "nvlink"
    link_group: int = 0  # 0: every device of the node at interconnect_gbps
    cross_group_gbps: float = 0.0

    @property
    def compute_scale(self) -> float:
        """Share of the datasheet FLOPS the model's GEMMs start from (before compute_eff)."""
        return self.peak_fraction * self.matmul_fraction

    @property
    def one_shot_allreduce(self) -> bool:
        return self.link != "pcie"

    def tp_link_gbps(self, tp: int) -> float:
        """Bandwidth a TP group of `tp` devices runs its allreduces at."""
        if self.link_group and tp > self.link_group and self.cross_group_gbps:
            return self.cross_group_gbps
        return self.interconnect_gbps

    @property
    def fp8(self) -> bool:
        return self.fp8_tflops is not None


# PCIe cards in the usual 8-GPU dual-socket server: four per PCIe switch, and peer-to-peer
# traffic between the two sockets' halves at about 20 GB/s (our estimate from the 10-25 GB/s
# such servers measure), far below the switch's link. NVLink bridges (pairs of H100/A100 PCIe)
# are optional hardware and not assumed.
_PCIE: dict[str, Any] = {"link": "pcie", "link_group": 4, "cross_group_gbps": 20.0}

# Measured MAMF shares (see Accelerator.matmul_fraction).
_H100_MAMF = 0.803
_A100_SXM_MAMF = 0.869 / _H100_MAMF

_BUILTIN: tuple[Accelerator, ...] = (
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS and
    # FP8 3,958 TFLOPS with sparsity (half dense), NVLink 900 GB/s.
    Accelerator("H200", 141 * 1e9 / 2**30, 4800, 989, 900, fp8_tflops=1979, int8_tops=1979,
                source="NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): 80 GB HBM3, 3.35 TB/s, BF16 1,979 / FP8 3,958
    # TFLOPS with sparsity, NVLink 900 GB/s.
    Accelerator("H100 SXM", 79.6, 3350, 989, 900, fp8_tflops=1979, int8_tops=1979,
                source="NVIDIA H100 Tensor Core GPU datasheet (SXM)"),
    # NVIDIA H100 Tensor Core GPU datasheet (PCIe): 80 GB HBM2e, 2 TB/s, BF16 1,513 / FP8 3,026
    # TFLOPS with sparsity, PCIe Gen5 128 GB/s (NVLink bridge pairs only).
    Accelerator("H100 PCIe", 80, 2000, 756, 128, fp8_tflops=1513, int8_tops=1513, **_PCIE,
                source="NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): HBM2e 2,039 GB/s, BF16 312 TFLOPS,
    # INT8 624 TOPS, NVLink 600 GB/s.
    Accelerator("A100 80GB", 80, 2039, 312, 600, int8_tops=624, matmul_fraction=_A100_SXM_MAMF,
                source="NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)"),
    # NVIDIA A100 Tensor Core GPU datasheet (40GB SXM): HBM2 1,555 GB/s, BF16 312 TFLOPS, NVLink
    # 600 GB/s.
    Accelerator("A100 40GB", 40, 1555, 312, 600, int8_tops=624, matmul_fraction=_A100_SXM_MAMF,
                source="NVIDIA A100 Tensor Core GPU datasheet (40GB SXM)"),
    # NVIDIA A100 Tensor Core GPU datasheet (80GB PCIe): HBM2e 1,935 GB/s, BF16 312 TFLOPS, INT8
    # 624 TOPS, PCIe Gen4 64 GB/s (NVLink bridge for two GPUs only).
    Accelerator("A100 PCIe", 80, 1935, 312, 64, int8_tops=624, **_PCIE,
                matmul_fraction=0.811 / _H100_MAMF,
                source="NVIDIA A100 Tensor Core GPU datasheet (80GB PCIe)"),
    # NVIDIA L40S GPU datasheet: 48 GB GDDR6, 864 GB/s, BF16 362 TFLOPS dense (733 sparse), FP8
    # 733 dense (1,466 sparse), PCIe Gen4 x16 64 GB/s.
    Accelerator("L40S", 45.0, 864, 362, 64, fp8_tflops=733, int8_tops=733, **_PCIE,
                source="NVIDIA L40S GPU datasheet"),
    # NVIDIA L4 Tensor Core GPU datasheet: 24 GB GDDR6, 300 GB/s, BF16 242 / FP8 485 TFLOPS with
    # sparsity, PCIe Gen4 x16 64 GB/s.
    Accelerator("L4", 22.5, 300, 121, 64, fp8_tflops=242, int8_tops=242, **_PCIE,
                source="NVIDIA L4 Tensor Core GPU datasheet"),
    # NVIDIA A10 Tensor Core GPU datasheet (A10G is AWS's variant; NVIDIA publishes no separate
    # sheet): 24 GB GDDR6, 600 GB/s, BF16 125 TFLOPS dense (250 sparse), PCIe Gen4 64 GB/s.
    Accelerator("A10G", 22.5, 600, 125, 64, int8_tops=250, **_PCIE,
                source="NVIDIA A10 Tensor Core GPU datasheet"),
    # NVIDIA V100 Tensor Core GPU datasheet (SXM2 32GB): HBM2 900 GB/s, FP16 tensor 125 TFLOPS,
    # no BF16, NVLink 300 GB/s.
    Accelerator("V100 32GB", 32, 900, 125, 300, bf16=False,
                source="NVIDIA V100 Tensor Core GPU datasheet (SXM2)"),
    # NVIDIA T4 Tensor Core GPU datasheet: 16 GB GDDR6, 320 GB/s, FP16 65 TFLOPS, INT8 130 TOPS,
    # no BF16, PCIe Gen3 x16 32 GB/s.
    Accelerator("T4", 15.0, 320, 65, 32, int8_tops=130, bf16=False, **_PCIE,
                source="NVIDIA T4 Tensor Core GPU datasheet"),
    # AMD Instinct MI300X accelerator datasheet: 192 GB HBM3, 5.3 TB/s, BF16 1,307.4 TFLOPS and
    # FP8 2,614.9 TFLOPS dense, Infinity Fabric peak aggregate 896 GB/s. peak_fraction: ROCm
    # GEMMs reach a markedly smaller share of the marketed peak than cuBLAS does of Hopper's
    # (SemiAnalysis, "MI300X vs H100 vs H200 Benchmark Part 1: Training", Dec 2024); 0.65 is
    # our estimate, consistent with AMD's published vLLM throughput (tests/planner/published.csv)
    # and with the measured MAMF (51.4% of the datasheet, 0.64 of the H100's share), so no
    # matmul_fraction on top.
    Accelerator("MI300X", 192, 5300, 1307, 896, fp8_tflops=2615, int8_tops=2615,
                peak_fraction=0.65, source="AMD Instinct MI300X accelerator datasheet"),
    # AMD Instinct MI250X accelerator datasheet: 128 GB HBM2e, 3.2768 TB/s, BF16 383 TFLOPS per
    # module of two GCDs; ROCm exposes each GCD as one device, so the figures here are halves.
    # Infinity Fabric: 8 links x 100 GB/s per module.
    Accelerator("MI250X", 64, 1638.4, 191.5, 400, int8_tops=191.5, peak_fraction=0.65,
                source="AMD Instinct MI250X accelerator datasheet (per GCD)"),
    # Huawei Atlas 800T A2 / Ascend 910B product pages: 64 GB HBM2e, about 1.6 TB/s, FP16 about
    # 313 TFLOPS, HCCS 392 GB/s; public figures vary by bin, treat as approximate.
    Accelerator("Ascend 910B", 64, 1600, 313, 392, int8_tops=626, kind="npu",
                source="Huawei Atlas 800T A2 product page (Ascend 910B)"),
    # Intel Gaudi 2 AI accelerator white paper: 96 GB HBM2e, 2.46 TB/s, BF16 432 TFLOPS, FP8 865
    # TFLOPS, 21 of 24 x 100 GbE RoCE ports all-to-all inside a server (262.5 GB/s).
    Accelerator("Gaudi 2", 96, 2460, 432, 262.5, fp8_tflops=865, kind="npu",
                source="Intel Gaudi 2 AI accelerator white paper"),
    # No datasheet: a modest server socket (8-channel DDR4-3200 is 204.8 GB/s peak; about 2
    # TFLOPS BF16 with AVX-512) and the KV cache space vLLM's CPU backend reserves by default.
    # Override per job for real hosts.
    Accelerator("cpu", 32, 200, 2, 50, bf16=True, kind="cpu",
                source="generic server CPU socket (DDR4-3200 x8 channels)"),
)

_ALIASES: dict[str, str] = {
    "h200": "H200", "h200 sxm": "H200", "h200sxm": "H200",
    "h100": "H100 SXM", "h100 sxm": "H100 SXM", "h100sxm": "H100 SXM", "h100 80gb": "H100 SXM",
    "h100 pcie": "H100 PCIe", "h100pcie": "H100 PCIe",
    "a100": "A100 80GB", "a100 80gb": "A100 80GB", "a100 80g": "A100 80GB", "a100 sxm": "A100 80GB",
    "a100 40gb": "A100 40GB", "a100 40g": "A100 40GB",
    "a100 pcie": "A100 PCIe", "a100pcie": "A100 PCIe", "a100 80gb pcie": "A100 PCIe",
    "l40s": "L40S", "l4": "L4",
    "a10g": "A10G", "a10": "A10G",
    "v100": "V100 32GB", "v100 32gb": "V100 32GB",
    "t4": "T4",
    "mi300x": "MI300X", "mi300": "MI300X",
    "mi250x": "MI250X", "mi250": "MI250X",
    "ascend 910b": "Ascend 910B", "910b": "Ascend 910B", "ascend910b": "Ascend 910B",
    "gaudi 2": "Gaudi 2", "gaudi2": "Gaudi 2", "hpu": "Gaudi 2",
    "cpu": "cpu",
}


def _key(name: str) -> str:
    """Fold case, dashes and underscores so that 'H100-SXM' and 'h100 sxm' are one name."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@dataclass(frozen=True)
class Catalog:
    """A set of accelerator types looked up by name or alias, case-insensitively."""

    accelerators: tuple[Accelerator, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    def names(self) -> list[str]:
        return [a.name for a in self.accelerators]

    def get(self, name: str) -> Accelerator:
        key = _key(name)
        alias = dict(self.aliases).get(key)
        for acc in self.accelerators:
            if _key(acc.name) in (key, _key(alias or "")):
                return acc
        raise UserError(
            f"unknown accelerator {name!r}{self._did_you_mean(key)}; known: "
            f"{', '.join(self.names())} (or add it to the catalog)"
        )

    def _did_you_mean(self, key: str) -> str:
        """`, did you mean H100 SXM?` for the names and aliases closest to a mistyped one."""
        names = {_key(a.name): a.name for a in self.accelerators} | dict(self.aliases)
        close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
        found = list(dict.fromkeys(names[k] for k in close))
        return f", did you mean {' or '.join(found)}?" if found else ""

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Catalog:
        """Return a catalog where `{name: {field: value}}` overrides figures or adds a type.

        A new type needs at least memory_gib, memory_bw_gbps, bf16_tflops and interconnect_gbps.
        """
        accs = list(self.accelerators)
        allowed = {f.name for f in fields(Accelerator)} - {"name"}
        for name, figures in overrides.items():
            unknown = set(figures) - allowed
            if unknown:
                raise UserError(
                    f"catalog override for {name!r}: unknown field(s) {sorted(unknown)}; "
                    f"known: {sorted(allowed)}"
                )
            accs = _apply_override(self, accs, name, dict(figures))
        return Catalog(tuple(accs), self.aliases)


def _apply_override(
    catalog: Catalog, accs: list[Accelerator], name: str, figures: dict[str, Any]
) -> list[Accelerator]:
    try:
        current = catalog.get(name)
    except UserError:
        current = None
    if current is None:
        needed = {"memory_gib", "memory_bw_gbps", "bf16_tflops", "interconnect_gbps"}
        missing = needed - set(figures)
        if missing:
            raise UserError(f"new accelerator {name!r} needs {sorted(missing)} in the catalog")
        return [*accs, Accelerator(name=name, **figures)]
    return [replace(a, **figures) if a.name == current.name else a for a in accs]


DEFAULT_CATALOG = Catalog(_BUILTIN, tuple(sorted(_ALIASES.items())))


def get_accelerator(name: str, catalog: Catalog | None = None) -> Accelerator:
    return (catalog or DEFAULT_CATALOG).get(name)


def with_overrides(overrides: Mapping[str, Mapping[str, Any]]) -> Catalog:
    """The default catalog with a job file's additions and corrections applied."""
    return DEFAULT_CATALOG.with_overrides(overrides)
