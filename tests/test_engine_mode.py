"""Where each instance runs vLLM's engine core, chosen per job from the rows it has to run:
in the worker's process for a short job (it starts sooner), in its own for a long one (it
generates faster)."""

from __future__ import annotations

import os
from pathlib import Path

from hetbatch.engines.factory import BREAK_EVEN_TOKENS, engine_in_own_process
from hetbatch.launch.local import LocalLauncher
from hetbatch.spec import parse_job
from tests.jobutil import make_input, sim_job, sim_pool


def _modes(tmp: Path, rows: int, instances: int, **extra) -> dict[str, bool]:
    """What each worker is told when it joins the job."""
    src = make_input(tmp / f"in-{rows}.parquet", rows, row_group_size=5000)
    spec = sim_job(tmp / f"{rows}-{instances}", src,
                   [sim_pool("cpu", 1000.0, devices_per_node=instances)],
                   sampling={"max_tokens": 32}, **extra)
    launcher = LocalLauncher(parse_job(spec, "test"))
    joined = launcher.worker_job(launcher.prepare())
    return {name: i["own_process"] for name, i in joined["instances"].items()}


def test_short_job_in_process_long_job_in_own_process(tmp_path) -> None:
    spare = len(os.sched_getaffinity(0)) > 1  # a core beside the instance's for vLLM's front end
    assert _modes(tmp_path, 5_000, 1) == {"cpu-0-0": False}
    assert _modes(tmp_path, 60_000, 1) == {"cpu-0-0": spare}


def test_no_own_process_when_engines_fill_the_node(tmp_path) -> None:
    """Every core runs an engine: vLLM's front end would only take turns with them."""
    cores = len(os.sched_getaffinity(0))
    modes = _modes(tmp_path, 60_000 * cores, cores)
    assert len(modes) == cores and not any(modes.values())


def test_job_setting_wins(tmp_path) -> None:
    assert _modes(tmp_path, 5_000, 1, engine={"multiprocessing": True}) == {"cpu-0-0": True}
    assert _modes(tmp_path, 60_000, 1, engine={"multiprocessing": False}) == {"cpu-0-0": False}


def test_break_even_counts_samples_and_tasks(tmp_path) -> None:
    src = make_input(tmp_path / "in.parquet", 10)
    base = sim_job(tmp_path, src, [sim_pool("cpu", 1000.0)], sampling={"max_tokens": 100})
    rows = BREAK_EVEN_TOKENS / 100
    assert engine_in_own_process(parse_job(base, "t"), rows, spare_core=True)
    assert not engine_in_own_process(parse_job(base, "t"), rows, spare_core=False)
    assert not engine_in_own_process(parse_job(base, "t"), rows / 2, spare_core=True)
    four = {**base, "sampling": {"max_tokens": 100, "n": 4}}
    assert engine_in_own_process(parse_job(four, "t"), rows / 2, spare_core=True)
    embed = {**base, "task": "embed"}
    assert not engine_in_own_process(parse_job(embed, "t"), rows * 10, spare_core=True)


def test_worker_threads_keep_off_the_engines_cores(tmp_path) -> None:
    """A worker's own threads (and vLLM's front end) run on the cores of its node that no
    engine runs on; all of them when engines fill the node, or off the CPU."""
    from hetbatch.worker.main import cpu_split

    cores = sorted(os.sched_getaffinity(0))
    src = make_input(tmp_path / "in.parquet", 10)
    spec = sim_job(tmp_path, src, [sim_pool("cpu", 1000.0, devices_per_node=1)])
    launcher = LocalLauncher(parse_job(spec, "test"))
    instances = launcher.worker_job(launcher.prepare())["instances"]
    (one,) = instances.values()
    engine, helpers = cpu_split(instances, {**one, "accelerator": "cpu"})
    assert engine == {one["devices"][0]}
    assert helpers == (set(cores) - engine or set(cores))
    # Two engines on the node fill a 2-core node: the helpers may use every core.
    two = {"a": {**one, "accelerator": "cpu", "devices": [cores[0]]},
           "b": {**one, "accelerator": "cpu", "devices": [cores[-1]]}}
    if len(cores) == 2:
        assert cpu_split(two, two["a"]) == ({cores[0]}, set(cores))
    # Another node's engines take nothing from this one.
    elsewhere = {**two, "b": {**two["b"], "node": one["node"] + 1}}
    assert cpu_split(elsewhere, elsewhere["a"])[1] == (set(cores) - {cores[0]} or set(cores))
    # Off the CPU the engine has no cores of its own.
    assert cpu_split(instances, {**one, "accelerator": "gpu"}) == (set(), set(cores))
