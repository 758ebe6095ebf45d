"""`hetbatch report`: the page of a real run opened in real headless Chromium, its numbers
against the job's metrics, and the per-unit record the coordinator writes for it."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.browser import PageFigures, console_problems, ink, render
from tests.jobutil import (
    TINY_ENGINE_ARGS,
    busy_worker,
    ledger,
    make_input,
    run_cli,
    sim_job,
    sim_pool,
    start_run,
    write_job,
)
from tests.s3server import S3Server

DATA = Path(__file__).resolve().parents[1] / "data" / "prompts.parquet"
CHARTS = ("gantt", "throughput", "time-use", "lengths")


def _vllm_input(path: Path, rows: int) -> Path:
    table = pl.read_parquet(DATA).head(rows).select("id", "prompt").to_arrow()
    bad = pa.table({"id": ["bad-null", "bad-long"], "prompt": [None, "many words " * 600]})
    pq.write_table(pa.concat_tables([table.cast(bad.schema), bad]), path, row_group_size=100)
    return path


def _assert_self_contained(page: str) -> None:
    """Nothing to fetch: no script, no stylesheet link, every reference inside the page."""
    assert "<script" not in page and "<link" not in page
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert all(r.startswith(("#", "data:")) for r in refs), [r for r in refs if r[:1] != "#"]


def _assert_drawn(png: Path, min_ink: float) -> None:
    share, colours = ink(png)
    assert share > min_ink and colours > 8, f"{png.name}: {share:.3f} ink, {colours} colours"


@pytest.mark.vllm
def test_report_of_a_real_run_in_chromium(tmp_path, tiny_model) -> None:
    src = _vllm_input(tmp_path / "in.parquet", 600)
    job = {
        "model": {"path": str(tiny_model), "engine_args": dict(TINY_ENGINE_ARGS)},
        "input": {"path": str(src), "prompt_column": "prompt", "id_column": "id"},
        "sampling": {"max_tokens": 16, "temperature": 0.8},
        "seed": 3,
        "output": {"path": str(tmp_path / "out")},
        "scheduler": {"max_unit_rows": 64, "heartbeat_s": 0.5},
        "cluster": {"pools": [{"name": "cpu", "accelerator": "cpu", "devices_per_node": 2}]},
    }
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    page_path, png_dir = tmp_path / "report.html", tmp_path / "png"
    made = run_cli("report", str(out), "-o", str(page_path), "--png", str(png_dir),
                   "--price", "cpu=0.5")
    assert made.returncode == 0, made.stderr
    page = page_path.read_text()
    _assert_self_contained(page)
    for name in CHARTS:
        _assert_drawn(png_dir / f"{name}.png", 0.01)

    shown = render(page_path, tmp_path)
    assert console_problems(shown.log) == []
    _assert_drawn(shown.screenshot, 0.05)
    figures = PageFigures(shown.dom)
    assert figures.svgs >= len(CHARTS)

    metrics = json.loads((out / "_hetbatch" / "metrics.json").read_text())
    top = figures.top
    assert int(top["rows"]) == metrics["rows_total"] == 602
    assert float(top["makespan_s"]) == pytest.approx(metrics["wall_s"])
    per_instance = metrics["instances"]
    assert set(figures.instances) == set(per_instance) and len(per_instance) == 2
    for name, m in per_instance.items():
        row = figures.instances[name]
        assert int(row["rows"]) == m["rows"]
        assert int(row["units"]) == m["units"]
        assert int(row["completion_tokens"]) == m["completion_tokens"]
    tokens = sum(m["completion_tokens"] for m in per_instance.values())
    assert int(top["completion_tokens"]) == tokens
    assert float(top["output_tokens_per_s"]) == pytest.approx(tokens / metrics["wall_s"])
    assert int(top["errors"]) == sum(m["errors"] for m in per_instance.values()) == 2
    assert 0.3 < float(top["efficiency"]) <= 1.0
    # Two 1-core instances held for the makespan at 0.5 per device-hour.
    assert float(top["cost"]) == pytest.approx(2 * 0.5 * metrics["wall_s"] / 3600)
    assert "prompt is null" in shown.dom and "bad-long" in shown.dom
    plan = json.loads((out / "_hetbatch" / "plan.json").read_text())
    planned = {p["pool"]: p["output_tokens_per_s"] for p in plan["pools"]}
    assert float(figures.pools["cpu"]["planned_rate"]) == pytest.approx(planned["cpu"])
    assert float(figures.pools["cpu"]["measured_rate"]) > 0


def _sim_run(tmp_path: Path, rows: int, pools: list[dict], **extra) -> tuple[Path, Path]:
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", rows), pools, **extra)
    return write_job(tmp_path / "job.yaml", job), tmp_path / "out"


def test_stolen_units_are_recorded_and_shown(tmp_path) -> None:
    # The slow pool claims the fast one's capacity: its first unit is far too big, so the fast
    # instance runs dry and steals the unstarted tail of it.
    job_file, out = _sim_run(
        tmp_path, 6000,
        [sim_pool("fast", 40_000), sim_pool("slow", 2_000, capacity_weight=40_000)],
        scheduler={"heartbeat_s": 0.1, "max_unit_rows": 2000},
    )
    assert run_cli("run", str(job_file)).returncode == 0
    records = ledger(out)
    assert all(r["leased_at"] <= r["at"] and r["pool"] in ("fast", "slow") for r in records)
    stolen = [r for r in records if r["stolen"]]
    assert any(r["instance"] == "fast-0-0" for r in stolen)
    made = run_cli("report", str(out), "-o", str(tmp_path / "r.html"))
    assert made.returncode == 0, made.stderr
    figures = PageFigures((tmp_path / "r.html").read_text())
    assert int(figures.top["units"]) == len(records)
    assert "stolen" in (tmp_path / "r.html").read_text()


def test_redealt_units_after_a_killed_worker(tmp_path) -> None:
    job_file, out = _sim_run(
        tmp_path, 8000, [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        launch={"max_worker_restarts": 0}, scheduler={"max_unit_rows": 300},
    )
    proc = start_run(job_file, out, 2)
    victim_pid = busy_worker(proc.pid, out)
    os.kill(victim_pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    redealt = [r for r in ledger(out) if r["redealt"]]
    assert redealt, "the killed worker's units came back without the re-dealt mark"
    made = run_cli("report", str(out), "-o", str(tmp_path / "r.html"))
    assert made.returncode == 0, made.stderr


def test_report_of_a_running_job_then_simulated_beside_it(tmp_path) -> None:
    job_file, out = _sim_run(tmp_path, 8_000, [sim_pool("a", 3_000), sim_pool("b", 6_000)])
    proc = start_run(job_file, out, 3)
    try:
        made = run_cli("report", f"file://{out}", "-o", str(tmp_path / "live.html"))
        assert made.returncode == 0, made.stderr
        live = PageFigures((tmp_path / "live.html").read_text())
        assert 0 < int(live.top["rows"]) < 8_000
        assert "in progress" in (tmp_path / "live.html").read_text()
    finally:
        proc.communicate(timeout=120)
    sim = run_cli("simulate", str(job_file), "--report", str(tmp_path / "sim.html"))
    assert sim.returncode == 0, sim.stderr
    page = (tmp_path / "sim.html").read_text()
    _assert_self_contained(page)
    figures = PageFigures(page)
    assert int(figures.top["rows"]) == 8_000 and figures.svgs >= len(CHARTS)
    assert set(figures.pools) == {"a", "b"}


def test_report_of_an_openai_batch_output(tmp_path) -> None:
    """JSONL shards are read like Parquet ones: lengths of every good row, a bad line's error
    with its custom_id as the example."""
    from tests.test_openai_batch import request, sim_openai_job, write_lines

    lines = [request(i, max_tokens=1 + i % 5) for i in range(300)]
    lines[7] = json.dumps({"custom_id": "request-7", "method": "POST", "url": "/v1/embeddings",
                           "body": {"input": "x"}})
    write_lines(tmp_path / "in.jsonl", lines)
    job = sim_openai_job(tmp_path, str(tmp_path / "in.jsonl"))
    assert run_cli("run", str(write_job(tmp_path / "job.yaml", job))).returncode == 0
    made = run_cli("report", str(tmp_path / "out"), "-o", str(tmp_path / "r.html"))
    assert made.returncode == 0, made.stderr
    page = (tmp_path / "r.html").read_text()
    assert "all 299 rows without an error" in page
    assert "request-7: " in page and "/v1/embeddings" in page
    assert int(PageFigures(page).top["errors"]) == 1


def test_report_costs_what_the_run_summary_costs(tmp_path) -> None:
    """Prices from the job's pools, no --price: the report's cost is the one metrics.json
    records (every device of a pool for the whole run), per pool and overall."""
    job_file, out = _sim_run(
        tmp_path, 3000,
        [sim_pool("a", 8_000, devices_per_node=2, price_per_device_hour=3.0),
         sim_pool("b", 4_000, price_per_device_hour=1.0)],
    )
    assert run_cli("run", str(job_file)).returncode == 0
    cost = json.loads((out / "_hetbatch" / "metrics.json").read_text())["cost"]
    made = run_cli("report", str(out), "-o", str(tmp_path / "r.html"))
    assert made.returncode == 0, made.stderr
    figures = PageFigures((tmp_path / "r.html").read_text())
    assert float(figures.top["cost"]) == pytest.approx(cost["overall"]["dollars"], abs=1e-5)
    for pool in ("a", "b"):
        assert float(figures.pools[pool]["cost"]) == pytest.approx(
            cost["pools"][pool]["dollars"], abs=1e-5
        )


def test_report_refuses_bad_input_in_one_line(tmp_path) -> None:
    empty = run_cli("report", str(tmp_path / "nothing"), "-o", str(tmp_path / "r.html"))
    assert empty.returncode == 2 and empty.stderr.count("\n") == 1
    assert "no hetbatch job has written here" in empty.stderr
    job_file, out = _sim_run(tmp_path, 500, [sim_pool("a", 8_000)])
    assert run_cli("run", str(job_file)).returncode == 0
    bad = run_cli("report", str(out), "--price", "a=cheap")
    assert bad.returncode == 2 and "--price 'a=cheap'" in bad.stderr
    assert "Traceback" not in bad.stderr + empty.stderr


def test_report_of_a_job_on_an_object_store(tmp_path, s3_env: S3Server) -> None:
    url = f"s3://{s3_env.new_bucket()}/out"
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 3000),
                  [sim_pool("a", 8_000), sim_pool("b", 4_000)],
                  output={"path": url})
    result = run_cli("run", str(write_job(tmp_path / "job.yaml", job)))
    assert result.returncode == 0, result.stderr
    made = run_cli("report", url, "-o", str(tmp_path / "r.html"))
    assert made.returncode == 0, made.stderr
    figures = PageFigures((tmp_path / "r.html").read_text())
    assert int(figures.top["rows"]) == 3000 and figures.svgs >= len(CHARTS)
    assert {int(v["rows"]) for v in figures.instances.values()} != {0}
    assert sum(int(v["rows"]) for v in figures.instances.values()) == 3000
