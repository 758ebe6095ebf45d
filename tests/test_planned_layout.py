"""`hetbatch run` takes the instance layout from the planner when the job does not pin it."""

from __future__ import annotations

import json

from hetbatch.launch.local import LocalLauncher
from hetbatch.spec import parse_job
from tests.jobutil import make_input


def _job(tmp_path, model, pool_extra):
    return parse_job(
        {
            "model": {"path": str(model), "engine_args": {"max_model_len": 512}},
            "input": {
                "path": str(make_input(tmp_path / "in.parquet", 50)),
                "prompt_column": "prompt",
            },
            "output": {"path": str(tmp_path / "out")},
            "cluster": {
                "pools": [
                    {"name": "cpu", "accelerator": "cpu", "devices_per_node": 2, **pool_extra}
                ]
            },
        }
    )


def test_unpinned_pool_is_sized_by_the_plan(tmp_path, tiny_model) -> None:
    run = LocalLauncher(_job(tmp_path, tiny_model, {})).prepare()
    plan = json.loads((tmp_path / "out" / "_hetbatch" / "plan.json").read_text())
    (pool,) = plan["pools"]
    assert len(run.instances) == pool["instances"]
    for inst in run.instances:
        assert inst.weight > 1  # the plan's tokens/s, not the bare default
        assert inst.engine_args["max_num_seqs"] == pool["max_num_seqs"]
        assert inst.engine_args["max_model_len"] == 512  # the job's own args win


def test_pinned_pool_is_not_planned(tmp_path, tiny_model) -> None:
    run = LocalLauncher(_job(tmp_path, tiny_model, {"tensor_parallel_size": 2})).prepare()
    assert not (tmp_path / "out" / "_hetbatch" / "plan.json").exists()
    (inst,) = run.instances
    assert inst.devices == (0, 1) and inst.engine_args["tensor_parallel_size"] == 2
