"""Fixtures that bring up the loopback Slurm cluster (slurm/testcluster/cluster.py).

``slurm_cluster`` is one cluster for the whole session, with ``SLURM_CONF`` exported so plain
``sbatch``/``squeue`` calls (and code under test that shells out to them) reach it.
``make_slurm_cluster`` starts extra, private clusters for tests that stop or break one.

Without Slurm installed the tests skip, except under CI, where a missing install is a bug.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from slurm.testcluster.cluster import LoopbackSlurm

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_PY = REPO_ROOT / "slurm" / "testcluster" / "cluster.py"


def _load_cluster_module() -> ModuleType:
    """Import cluster.py by path: ``slurm/`` is not a package and its name is generic."""
    name = "hetbatch_slurm_testcluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLUSTER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


testcluster = _load_cluster_module()

# Node ids of failed tests in this directory: their clusters' logs are kept for reading.
_failed_here: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Note failures of tests here only: failures elsewhere in the suite say nothing of Slurm."""
    report = yield
    if report.failed:
        _failed_here.append(item.nodeid)
    return report


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _require_slurm() -> None:
    missing = testcluster.missing_binaries()
    if not missing:
        return
    reason = (f"Slurm is not installed (missing {', '.join(missing)}); "
              "run .ci/install-test-packages.sh")
    if _in_ci():
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


def _new_state_dir() -> Path:
    """A short directory straight under /tmp: munged wants every parent of its socket
    traversable (pytest's tmp root is 0700) and socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="hetbatch-slurm-", dir="/tmp"))


def _cleanup(cluster: LoopbackSlurm, failed: bool) -> None:
    """Stop the cluster; keep its logs when something failed, so they can be read."""
    try:
        cluster.stop()
    finally:
        if failed:
            print(f"\nloopback Slurm state kept in {cluster.state_dir}", file=sys.stderr)
        else:
            shutil.rmtree(cluster.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LoopbackSlurm]:
    """A running 3-node cluster (n1 a100:2, n2 l40s:2, n3 a100:1+l40s:1; partitions cpu, gpu).

    Yields a ``LoopbackSlurm``: ``conf_path``, ``state_dir``, ``run([...])``,
    ``sbatch(script, args)``, ``job_state(id)``, ``wait_job(id, timeout)``.
    """
    _require_slurm()
    cluster = testcluster.LoopbackSlurm(_new_state_dir())
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf_path)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        _cleanup(cluster, failed=bool(_failed_here))


@pytest.fixture
def make_slurm_cluster() -> Iterator[Callable[..., LoopbackSlurm]]:
    """Factory for private clusters (not started); each is stopped after the test.

    Call it with an optional state dir and ``LoopbackSlurm`` keyword arguments.
    """
    _require_slurm()
    made: list[LoopbackSlurm] = []

    def make(state_dir: Path | None = None, **kwargs: Any) -> LoopbackSlurm:
        cluster = testcluster.LoopbackSlurm(state_dir or _new_state_dir(), **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        _cleanup(cluster, failed=bool(_failed_here))
