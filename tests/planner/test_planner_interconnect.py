"""Interconnect per accelerator variant: NVLink parts scale TP, PCIe parts stop at a switch."""

from __future__ import annotations

import pytest

from hetbatch.planner import PoolRequest, Workload, load_model_profile, plan_cluster
from hetbatch.planner.catalog import get_accelerator
from hetbatch.planner.model import Deployment, allreduce_latency_units, predict


def _rate(model: str, quant: str, gpu: str, tp: int) -> float:
    d = Deployment.uncalibrated(load_model_profile(model, quant), get_accelerator(gpu), tp)
    return predict(d, 1000, 1000, max_num_seqs=256)[0].output_tokens_per_s


def test_a100_pcie_is_its_own_entry() -> None:
    pcie, sxm = get_accelerator("A100 PCIe"), get_accelerator("a100-80gb")
    assert pcie.name == "A100 PCIe" and sxm.name == "A100 80GB"
    assert pcie.link == "pcie" and sxm.link == "nvlink"
    assert pcie.memory_bw_gbps < sxm.memory_bw_gbps
    assert pcie.tp_link_gbps(8) < pcie.tp_link_gbps(4) < sxm.tp_link_gbps(8)


@pytest.mark.parametrize("gpu", ["L40S", "A100 PCIe"])
@pytest.mark.parametrize("model,quant", [("llama-3.1-8b", "bf16"), ("llama-3.1-70b", "fp8")])
def test_tp8_on_pcie_is_no_better_than_tp4(gpu: str, model: str, quant: str) -> None:
    assert _rate(model, quant, gpu, 8) <= _rate(model, quant, gpu, 4)


def test_tp8_on_nvlink_beats_tp4() -> None:
    for gpu in ("H100 SXM", "A100 80GB"):
        assert _rate("llama-3.1-70b", "bf16", gpu, 8) > 1.3 * _rate("llama-3.1-70b", "bf16",
                                                                     gpu, 4)


def test_ring_allreduce_only_beyond_two_pcie_devices() -> None:
    l40s, h100 = get_accelerator("L40S"), get_accelerator("H100")
    assert allreduce_latency_units(l40s, 2) == allreduce_latency_units(h100, 8) == 1.0
    assert allreduce_latency_units(l40s, 8) > allreduce_latency_units(l40s, 4) > 1.0


def test_search_splits_a_pcie_node_into_tp4_instances() -> None:
    model = load_model_profile("llama-3.1-70b", "fp8")
    work = Workload(input_len_mean=1000, input_len_p95=2000, output_len_mean=500)
    plan = plan_cluster(model, [PoolRequest("l40s", "L40S", 8)], work)
    cfg = plan.pools[0].config
    assert cfg.tensor_parallel_size == 4 and cfg.instances == 2


def test_max_num_seqs_search_reaches_thousands_on_large_memory() -> None:
    model = load_model_profile("llama-3.1-70b", "fp8")
    work = Workload(input_len_mean=128, input_len_p95=128, output_len_mean=2048)
    plan = plan_cluster(model, [PoolRequest("mi300x", "MI300X", 8, tensor_parallel_size=8)],
                        work)
    assert plan.pools[0].config.max_num_seqs >= 2048
    pinned = plan_cluster(model, [PoolRequest("mi300x", "MI300X", 8, tensor_parallel_size=8,
                                              max_num_seqs=3200)], work)
    assert pinned.pools[0].config.max_num_seqs == 3200
