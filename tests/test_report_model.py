"""The report's figures and the watch view's rates, computed from per-unit records."""

from __future__ import annotations

import numpy as np
import pytest

from hetbatch.coordinator.ledger import CommitRecord
from hetbatch.report import model
from hetbatch.report.load import error_kind
from hetbatch.report.model import JobRun, Unit
from hetbatch.watch import snapshot


def _run(units: list[Unit], makespan: float) -> JobRun:
    return JobRun("t", "run", "complete", sum(u.rows for u in units), units,
                  {u.instance: u.pool for u in units}, makespan)


def _unit(inst: str, a: float, b: float, tokens: int = 100, pool: str = "p") -> Unit:
    return Unit(inst, pool, 0, 10, a, b, completion_tokens=tokens)


def test_an_instances_time_adds_up_to_the_makespan() -> None:
    # Busy 2-5 and 4-6 (overlapping: one span 2-6), then 8-9; the job ends at 12.
    run = _run([_unit("a", 2, 5), _unit("a", 4, 6), _unit("a", 8, 9), _unit("b", 0, 12)], 12)
    t = model.instance_time(run, "a")
    assert (t.busy, t.startup, t.waiting, t.tail) == (5, 2, 2, 3)
    assert t.busy + t.startup + t.waiting + t.tail == run.makespan_s


def test_fluid_bound_and_efficiency() -> None:
    # a: 400 tokens in 4 s busy (100/s) from t=0; b: 100 tokens in 1 s (100/s) from t=2.
    # Together 500 tokens: 200 by t=2 from a alone, then 200/s: done at 3.5.
    run = _run([_unit("a", 0, 4, 400), _unit("b", 2, 3, 100)], 5)
    assert model.fluid_bound(run) == pytest.approx(3.5)
    assert model.efficiency(run) == pytest.approx(0.7)


def test_throughput_series_keeps_every_token() -> None:
    run = _run([_unit("a", 0, 3, 300), _unit("b", 1, 9, 800, pool="q")], 10)
    centres, series = model.throughput_series(run, bins=20)
    width = centres[1] - centres[0]
    assert series["p"].sum() * width == pytest.approx(300)
    assert series["q"].sum() * width == pytest.approx(800)
    assert np.allclose(series["p"][:6], 100) and np.allclose(series["p"][6:], 0)


def test_cost_per_pool_uses_devices_and_makespan() -> None:
    run = _run([_unit("a", 0, 3600, 10**6)], 3600)
    run.prices, run.pool_devices = {"p": 2.5}, {"p": 8}
    assert model.pool_totals(run)["p"].cost == pytest.approx(20.0)


def test_error_kinds_group_messages_by_wording() -> None:
    a = error_kind("prompt of 901 tokens is longer than the model's context of 512")
    b = error_kind("prompt of 1200 tokens is longer than the model's context of 512")
    assert a == b != error_kind("prompt is null")


T0 = 1.8e9  # wall-clock seconds (0 means "not recorded" in a ledger line)


def _rec(inst: str, start: int, rows: int, leased: float, at: float, pool: str = "p"):
    return CommitRecord(start, start + rows, inst, completion_tokens=8 * rows, at=T0 + at,
                        leased_at=T0 + leased, pool=pool)


def test_watch_rates_eta_and_silent_instances() -> None:
    records = [_rec("a", 0, 100, 0, 10), _rec("a", 100, 100, 10, 20),
               _rec("b", 200, 50, 0, 5, pool="q")]
    snap = snapshot(records, 1000, now=T0 + 30.0, complete=False, window_s=60)
    assert snap.rows_done == 250 and snap.total.rows_per_s == pytest.approx(250 / 30)
    assert snap.eta_s == pytest.approx(750 / (250 / 30))
    assert snap.pools["q"].tokens_per_s == pytest.approx(400 / 30)
    assert snap.instances["a"].state == "working"  # 10 s since a commit; its units take 10 s
    assert snap.instances["b"].state == "silent"  # 25 s since its only 5 s unit
    live = {"instances": {"a": {"connected": False, "pool": "p"},
                          "c": {"connected": True, "pool": "q"}}}
    snap = snapshot(records, 1000, now=T0 + 30.0, complete=False, live=live)
    assert snap.instances["a"].state == "disconnected"
    assert snap.instances["c"].state == "starting"
