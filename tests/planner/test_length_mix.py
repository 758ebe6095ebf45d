"""The rows each pool receives when pools hold different contexts (rows by the context they
need): pure, from a sample of prompt lengths."""

from __future__ import annotations

from hetbatch.planner.length_mix import pool_workloads
from hetbatch.planner.types import Workload


def _workload(lens: list[int], rows: int = 10_000) -> Workload:
    return Workload.from_samples(lens, 100.0, rows=rows, output_len_max=200)


def test_short_rows_are_shared_and_long_rows_go_to_the_pool_that_holds_them() -> None:
    lens = [100] * 90 + [3000] * 10  # needs 300 and 3,200
    w = _workload(lens)
    mix = pool_workloads(lens, w, {"small": 2048, "big": 8192}, {"small": 1.0, "big": 1.0})
    small, big = mix["small"], mix["big"]
    assert small.input_len_max == 100 and small.input_len_mean == 100
    assert small.rows == 4500  # half the short rows
    assert big.input_len_max == 3000 and big.rows == 5500  # the other half, and every long row
    assert big.input_len_mean == (45 * 100 + 10 * 3000) / 55
    assert big.input_len_p95 == 3000


def test_devices_share_the_rows_every_pool_holds() -> None:
    lens = [100] * 80 + [3000] * 20
    mix = pool_workloads(lens, _workload(lens), {"small": 2048, "big": None},
                         {"small": 3.0, "big": 1.0})
    assert mix["small"].rows == 6000 and mix["big"].rows == 4000


def test_rows_no_pool_holds_are_left_out_and_equal_contexts_change_nothing() -> None:
    lens = [100] * 90 + [9000] * 10
    w = _workload(lens)
    mix = pool_workloads(lens, w, {"a": 2048, "b": 4096}, {"a": 1.0, "b": 1.0})
    assert mix["a"].rows + mix["b"].rows == 9000
    short = [100] * 50
    assert pool_workloads(short, _workload(short), {"a": 2048, "b": 4096}, {"a": 1, "b": 1}) == {}
