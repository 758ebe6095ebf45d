"""`hetbatch simulate` through click, on a job file with simulated engines."""

from __future__ import annotations

import json

import click
from click.testing import CliRunner

from hetbatch.sim.cli import simulate_command

JOB = """
model: {path: tiny}
input: {path: %s, prompt_column: prompt}
output: {path: %s}
engine: {kind: sim}
sampling: {max_tokens: 32}
scheduler: {min_unit_rows: 8, max_unit_rows: 256}
cluster:
  pools:
    - {name: fast, accelerator: cpu, devices_per_node: 2, sim: {tokens_per_s: 600, max_num_seqs: 8}}
    - {name: slow, accelerator: cpu, devices_per_node: 2, sim: {tokens_per_s: 200, max_num_seqs: 8}}
"""


def _cli() -> click.Group:
    group = click.Group()
    group.add_command(simulate_command)
    return group


def test_simulate_prints_json_with_faults_and_a_gantt(tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB % (tmp_path / "missing.parquet", tmp_path / "out"))
    png = tmp_path / "g.png"
    args = ["simulate", str(job), "--rows", "2000", "--json", "--lose", "fast-0-1@5",
            "--join", "slow-0-1@3", "--slow", "slow-0-0=0.5", "--gantt", str(png)]
    res = CliRunner().invoke(_cli(), args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["completed"] and sum(v["rows"] for v in data["instances"].values()) == 2000
    assert png.stat().st_size > 0
    text = CliRunner().invoke(_cli(), ["simulate", str(job), "--rows", "500"]).output
    assert "makespan" in text and "efficiency" in text


def test_simulate_bad_fault_is_a_one_line_user_error(tmp_path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB % (tmp_path / "missing.parquet", tmp_path / "out"))
    res = CliRunner().invoke(_cli(), ["simulate", str(job), "--lose", "nobody@3"])
    assert res.exit_code == 2 and "no instance 'nobody'" in res.output
