"""The sbatch scripts of a job, compared line for line with scripts recorded in `golden/`.

A change to the templates or to the options they receive shows here as a diff to read. After
an intended change, record the scripts again with `HETBATCH_RECORD_GOLDEN=1 pytest` and
review the diff of `golden/` before committing it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest

from hetbatch.errors import UserError
from hetbatch.launch.slurm.scripts import Script, render, render_hetjob
from hetbatch.layout import instance_layout
from hetbatch.spec import JobSpec, parse_job

GOLDEN = Path(__file__).parent / "golden"
PYTHON = "/opt/hetbatch/bin/python"  # stands in for the interpreter the tests run with
OUTPUT = "/shared/runs/demo"
LOGS = "/shared/runs/demo/_hetbatch/logs"


def _job() -> JobSpec:
    def pool(name: str, accelerator: str, devices: int, **extra: object) -> dict:
        return {"name": name, "accelerator": accelerator, "devices_per_node": devices,
                "sim": {"tokens_per_s": 1000, "max_num_seqs": 64}, **extra}

    return parse_job(
        {
            "model": {"path": "simulated"},
            "input": {"path": "/shared/data/prompts", "prompt_column": "prompt"},
            "output": {"path": OUTPUT},
            "engine": {"kind": "sim"},
            "slurm": {"job_name": "demo", "account": "ml", "time": "12:00:00",
                      "partition": "cpu", "extra": ["--mail-type=END"]},
            "cluster": {
                "pools": [
                    pool("a100", "A100", 8, tensor_parallel_size=2,
                         slurm={"partition": "gpu", "constraint": "a100_80g",
                                "extra": ["--exclusive"]}),
                    pool("l40s", "L40S", 4, nodes=3, tensor_parallel_size=1,
                         slurm={"gres_type": "l40s_48g", "qos": "low"}),
                    pool("cpu", "cpu", 16, nodes=2, tensor_parallel_size=16,
                         slurm={"array": False, "mem": "64G"}),
                ]
            },
        },
        "golden job",
    )


def _spanning_job() -> JobSpec:
    """A pool whose instances are TP=8 x PP=2 over two 8-GPU nodes, beside the golden job's."""
    spec = _job().to_dict()
    spec["cluster"]["pools"] = [{
        "name": "h100pp", "accelerator": "H100", "devices_per_node": 8, "nodes": 4,
        "tensor_parallel_size": 8, "pipeline_parallel_size": 2,
        "sim": {"tokens_per_s": 1000, "max_num_seqs": 64}, "slurm": {"partition": "gpu"},
    }]
    return parse_job(spec, "golden spanning job")


def _scripts() -> list[Script]:
    job, spanning = _job(), _spanning_job()
    return [
        *render(job, instance_layout(job), LOGS),
        render_hetjob(job, LOGS),
        *render(spanning, instance_layout(spanning), LOGS, coordinator=False),
    ]


def _fixed(text: str) -> str:
    return text.replace(shlex.quote(sys.executable), PYTHON)


@pytest.mark.parametrize(
    "name", ["coordinator", "pool-a100", "pool-l40s", "pool-cpu", "hetjob", "pool-h100pp"]
)
def test_rendered_script_matches_the_recorded_one(name: str) -> None:
    (script,) = [s for s in _scripts() if s.name == name]
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("HETBATCH_RECORD_GOLDEN"):
        golden.write_text(_fixed(script.text))
    assert _fixed(script.text) == golden.read_text()


def test_a_spanning_pool_is_one_allocation_of_its_nodes_per_instance() -> None:
    (script,) = [s for s in _scripts() if s.name == "pool-h100pp"]
    assert "#SBATCH --nodes=2" in script.text and "#SBATCH --array=0-1" in script.text
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1" in script.text


def test_a_hetjob_refuses_spanning_pools() -> None:
    with pytest.raises(UserError, match="h100pp"):
        render_hetjob(_spanning_job(), LOGS)


def test_every_recorded_script_is_still_rendered() -> None:
    assert {p.stem for p in GOLDEN.glob("*.sbatch")} == {s.name for s in _scripts()}
