"""Prefix order: rows sharing a prompt prefix dealt together, in bounded windows.

The ordering and the scheduler's follow-on dealing are pure and tested directly; whole jobs run
through the CLI on the simulated engine (exactly once, resume, rows joinable to the input) and
on real vLLM on CPU (same completions as in input order)."""

from __future__ import annotations

import itertools
import random
import signal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hetbatch.io.prefix_order import (
    LONG_PREFIX_CHARS,
    PrefixOrder,
    shares_long_prefixes,
    window_order,
)
from hetbatch.scheduler.core import Lease, Scheduler, SchedulerConfig
from tests.jobutil import (
    TINY_ENGINE_ARGS,
    assert_exactly_once,
    ledger,
    make_input,
    read_output,
    run_cli,
    sim_job,
    sim_pool,
    start_run,
    write_job,
)

SYSTEMS = [f"System prompt {k}: " + "you answer briefly and politely. " * 10 for k in range(25)]


def shared_prefix_input(path: Path, rows: int, groups: int = 25, ids: bool = True) -> pa.Table:
    """Rows over `groups` long system prompts, in random order."""
    rng = random.Random(7)
    picks = [rng.randrange(groups) for _ in range(rows)]
    columns = {"prompt": [f"{SYSTEMS[g]}Question {i}?" for i, g in enumerate(picks)],
               "group": picks}
    if ids:
        columns = {"id": [f"r{i:06d}" for i in range(rows)], **columns}
    table = pa.table(columns)
    pq.write_table(table, path, row_group_size=500)
    return table


def _group_runs(groups: list[int]) -> int:
    """How many runs of equal neighbours a sequence has (one per group when grouped)."""
    return 1 + sum(a != b for a, b in itertools.pairwise(groups))


# -- the order, pure -------------------------------------------------------------------------


def test_window_order_groups_by_text_and_keeps_ties_in_input_order() -> None:
    keys = ["b x", "a y", "b x", "a x", "b x"]
    assert window_order(keys) == [3, 1, 0, 2, 4]


def test_windows_cover_positions_and_the_last_is_shorter() -> None:
    order = PrefixOrder(window_rows=100, total_rows=250)
    assert order.windows(0, 100) == [(0, 100)]
    assert order.windows(90, 210) == [(0, 100), (100, 200), (200, 250)]
    assert order.boundaries() == [0, 100, 200]


def test_sampler_sees_shared_prefixes_only_when_order_would_help() -> None:
    rng = random.Random(0)
    scattered = [[SYSTEMS[rng.randrange(25)] + str(i) for i in range(500)] for _ in range(4)]
    grouped = [sorted(chunk) for chunk in scattered]
    distinct = [[f"{c}.{i} " * LONG_PREFIX_CHARS for i in range(500)] for c in range(4)]
    short = [[f"q{rng.randrange(25)}" for _ in range(500)] for _ in range(4)]
    assert shares_long_prefixes(scattered)
    assert not shares_long_prefixes(grouped)  # the input keeps them together already
    assert not shares_long_prefixes(distinct)
    assert not shares_long_prefixes(short)


# -- the scheduler's follow-on dealing -------------------------------------------------------


def _deal_all(scheduler: Scheduler, instances: list[str]) -> dict[str, list[Lease]]:
    got: dict[str, list[Lease]] = {i: [] for i in instances}
    now = 0.0
    for i in instances:
        scheduler.join(i, 1.0, now)
    while scheduler.pending:
        for i in instances:
            lease = scheduler.request(i, now)
            if isinstance(lease, Lease):
                got[i].append(lease)
                scheduler.commit(i, lease.lease_id, lease.start, lease.end, now + 1)
        now += 1.0
    return got


def test_each_instance_follows_on_from_its_own_last_unit() -> None:
    cfg = SchedulerConfig(min_unit_rows=10, max_unit_rows=100, follow_on=True)
    got = _deal_all(Scheduler(10_000, cfg, boundaries=range(0, 10_000, 1000)), ["a", "b", "c"])
    spans = sorted((le.start, le.end) for leases in got.values() for le in leases)
    assert spans[0][0] == 0 and spans[-1][1] == 10_000
    assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))  # each row once
    for leases in got.values():
        # An instance's units form a few long lanes, not one unit in three of the order.
        breaks = sum(x.end != y.start for x, y in itertools.pairwise(leases))
        assert breaks <= 4, [(le.start, le.end) for le in leases]
    starts = sorted(leases[0].start for leases in got.values())
    assert starts[0] == 0 and 5000 in starts  # the second lane starts at a window boundary


def test_without_follow_on_instances_take_turns() -> None:
    cfg = SchedulerConfig(min_unit_rows=10, max_unit_rows=100)
    got = _deal_all(Scheduler(10_000, cfg), ["a", "b", "c"])
    leases = got["a"]
    breaks = sum(x.end != y.start for x, y in itertools.pairwise(leases))
    assert breaks > 10


# -- whole jobs on the simulated engine ------------------------------------------------------


def _sim_job(tmp: Path, src: Path, **scheduler) -> Path:
    job = sim_job(tmp, src, [sim_pool("a", 20_000), sim_pool("b", 10_000)],
                  scheduler={"max_unit_rows": 200, "heartbeat_s": 0.3,
                             "prefix_window_rows": 1000, **scheduler})
    job["input"]["keep_columns"] = ["prompt", "group"]
    return write_job(tmp / "job.yaml", job)


def test_units_hold_prefix_groups_and_rows_join_back_to_the_input(tmp_path) -> None:
    rows = 3000
    table = shared_prefix_input(tmp_path / "in.parquet", rows)
    result = run_cli("run", "--no-progress",
                     str(_sim_job(tmp_path, tmp_path / "in.parquet", prefix_groups=True)))
    assert result.returncode == 0, result.stderr
    df = assert_exactly_once(tmp_path / "out", rows)
    joined = df.join(pl.from_arrow(table), on="id", suffix="_in")
    assert joined.height == rows and (joined["prompt"] == joined["prompt_in"]).all()
    for shard in (tmp_path / "out").glob("part-*.parquet"):
        groups = pq.read_table(shard, columns=["group"]).column("group").to_pylist()
        # Each group's rows in one run (two when the unit spans a window boundary).
        assert _group_runs(groups) <= len(set(groups)) + 1, shard.name
    assert df["instance"].n_unique() == 2


def test_without_an_id_column_row_id_is_the_input_row(tmp_path) -> None:
    rows = 2000
    table = shared_prefix_input(tmp_path / "in.parquet", rows, ids=False)
    job = sim_job(tmp_path, tmp_path / "in.parquet", [sim_pool("a", 20_000)],
                  scheduler={"max_unit_rows": 200, "prefix_groups": True,
                             "prefix_window_rows": 700})
    job["input"].update(id_column=None, keep_columns=["prompt"])
    result = run_cli("run", "--no-progress", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    df = read_output(tmp_path / "out").sort("row_id")
    assert df["row_id"].to_list() == list(range(rows))
    assert df["prompt"].to_list() == table.column("prompt").to_pylist()


def test_auto_turns_prefix_order_on_only_for_shared_prefixes(tmp_path) -> None:
    shared_prefix_input(tmp_path / "shared.parquet", 2000)
    make_input(tmp_path / "plain.parquet", 2000)
    for name, expected in (("shared", 1000), ("plain", None)):
        job = sim_job(tmp_path / name, tmp_path / f"{name}.parquet", [sim_pool("a", 20_000)],
                      scheduler={"prefix_window_rows": 1000})
        job["input"]["keep_columns"] = []
        result = run_cli("run", "--no-progress", str(write_job(tmp_path / f"{name}.yaml", job)))
        assert result.returncode == 0, result.stderr
        recorded = pl.read_json(tmp_path / name / "out" / "_hetbatch" / "job.json")
        assert recorded["prefix_window_rows"].to_list() == [expected]
        assert ("prefix order in windows of 1,000 rows" in result.stdout) == bool(expected)
        assert_exactly_once(tmp_path / name / "out", 2000)


def test_resume_after_sigkill_keeps_the_order_and_redoes_nothing(tmp_path) -> None:
    rows = 12_000
    shared_prefix_input(tmp_path / "in.parquet", rows)
    job_file = _sim_job(tmp_path, tmp_path / "in.parquet", prefix_groups=True)
    job_file.write_text(job_file.read_text().replace("tokens_per_s: 20000", "tokens_per_s: 6000")
                        .replace("tokens_per_s: 10000", "tokens_per_s: 6000"))
    out = tmp_path / "out"
    proc = start_run(job_file, out, 4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ledger(out)
    assert not (out / "_SUCCESS").exists()
    # Resuming with `auto` keeps the recorded order; asking for input order is refused.
    changed = tmp_path / "changed.yaml"
    changed.write_text(job_file.read_text().replace("prefix_groups: true", "prefix_groups: false"))
    refused = run_cli("run", str(changed))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "holds output dealt in prefix_window_rows 1000" in refused.stderr
    auto = tmp_path / "auto.yaml"
    auto.write_text(job_file.read_text().replace("prefix_groups: true", "prefix_groups: auto"))
    result = run_cli("run", str(auto))
    assert result.returncode == 0, result.stderr
    assert "resuming with" in result.stdout
    df = assert_exactly_once(out, rows)
    assert ledger(out)[: len(before)] == before
    joined = df.join(pl.read_parquet(tmp_path / "in.parquet"), on="id", suffix="_in")
    assert (joined["prompt"] == joined["prompt_in"]).all()


@pytest.mark.parametrize("value", ["maybe", 3])
def test_bad_prefix_groups_value_is_one_line(tmp_path, value) -> None:
    shared_prefix_input(tmp_path / "in.parquet", 100)
    job = sim_job(tmp_path, tmp_path / "in.parquet", [sim_pool("a", 20_000)],
                  scheduler={"prefix_groups": value})
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "scheduler.prefix_groups: expected true, false or auto" in lines[0]
    assert not (tmp_path / "out").exists()


# -- real vLLM on CPU ------------------------------------------------------------------------


@pytest.mark.vllm
def test_vllm_prefix_order_gives_the_same_completions(tmp_path, tiny_model) -> None:
    rows = 400
    table = shared_prefix_input(tmp_path / "in.parquet", rows, groups=5)
    outputs = {}
    for setting in (False, True):
        name = "grouped" if setting else "input"
        job = {
            "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
            "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt",
                      "id_column": "id", "keep_columns": ["group"]},
            "sampling": {"max_tokens": 8, "temperature": 0.8},
            "seed": 3,
            "output": {"path": str(tmp_path / name)},
            "scheduler": {"max_unit_rows": 50, "heartbeat_s": 0.5, "prefix_groups": setting,
                          "prefix_window_rows": 200},
            "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
        }
        result = run_cli("run", "--no-progress", str(write_job(tmp_path / f"{name}.yaml", job)))
        assert result.returncode == 0, result.stderr
        outputs[name] = assert_exactly_once(tmp_path / name, rows).sort("id")
    grouped, plain = outputs["grouped"], outputs["input"]
    assert grouped["generated_text"].to_list() == plain["generated_text"].to_list()
    assert grouped["prompt_tokens"].to_list() == plain["prompt_tokens"].to_list()
    assert grouped["group"].to_list() == table.column("group").to_pylist()
    for shard in (tmp_path / "grouped").glob("part-*.parquet"):
        groups = pq.read_table(shard, columns=["group"]).column("group").to_pylist()
        assert _group_runs(groups) <= len(set(groups)) + 1, shard.name


def test_auto_detection_and_the_planner_share_one_read_of_the_sample(
    tmp_path, tiny_model, monkeypatch
) -> None:
    from hetbatch.io import sample as sample_module
    from hetbatch.launch.local import LocalLauncher
    from hetbatch.spec import parse_job

    reads: list[tuple[int, int]] = []
    read_rows = sample_module.read_rows

    def counting(dataset, start, end, columns):
        reads.append((start, end))
        return read_rows(dataset, start, end, columns)

    monkeypatch.setattr(sample_module, "read_rows", counting)
    shared_prefix_input(tmp_path / "in.parquet", 4000)
    job = parse_job({
        "model": {"path": str(tiny_model), "engine_args": {"max_model_len": 512}},
        "input": {"path": str(tmp_path / "in.parquet"), "prompt_column": "prompt",
                  "id_column": "id"},
        "output": {"path": str(tmp_path / "out")},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
    })
    launcher = LocalLauncher(job)
    run = launcher.prepare(dry_run=True)
    assert run.prefix_window_rows == job.scheduler.prefix_window_rows  # auto turned it on
    assert launcher._sample is not None  # the planner ran on it (the pool is unpinned)
    assert len(reads) == 4 and sum(e - s for s, e in reads) == 2000  # one read of 2,000 rows


# -- the simulator -----------------------------------------------------------------------------


def _simulated(tmp_path: Path, name: str, prefix_groups: bool) -> float:
    from hetbatch.cli.simulate import predict
    from hetbatch.spec import parse_job

    job = parse_job({
        "model": {"path": "unused"},
        "input": {"path": str(tmp_path / f"{name}.parquet"), "prompt_column": "prompt"},
        "output": {"path": str(tmp_path / "out")},
        "sampling": {"max_tokens": 32},
        "scheduler": {"prefix_groups": prefix_groups},
        "cluster": {"pools": [{"name": "a", "accelerator": "cpu", "devices_per_node": 2,
                               "tensor_parallel_size": 1, "capacity_weight": 2000}]},
    })
    return predict(job).makespan


def test_simulator_prices_the_prefix_cache_in_dealing_order(tmp_path) -> None:
    """Many documents, a few questions each, in random order: the rows of a document lie far
    apart in input order (the cache has evicted a document before its next question comes)
    and next to each other in prefix order, so the simulated job is faster with it. Over 25
    system prompts every prefix stays cached in either order: no difference."""
    rng = random.Random(3)
    docs = [f"Document {d}: " + " ".join(rng.choice(["data", "river", "stone", "light"])
                                         for _ in range(300)) for d in range(2000)]
    picks = [rng.randrange(len(docs)) for _ in range(8000)]
    pq.write_table(pa.table({"prompt": [f"{docs[d]}\nQuestion {i}?" for i, d in
                                        enumerate(picks)]}), tmp_path / "docs.parquet")
    shared_prefix_input(tmp_path / "few.parquet", 8000)
    off, on = _simulated(tmp_path, "docs", False), _simulated(tmp_path, "docs", True)
    assert on < 0.75 * off, (on, off)
    off, on = _simulated(tmp_path, "few", False), _simulated(tmp_path, "few", True)
    assert on == pytest.approx(off, rel=0.03)
