"""A non-editable install works on its own: `pip install .` into a fresh virtualenv, then
`hetbatch submit --dry-run` renders every script from the templates shipped in the package.

The new virtualenv reuses the packages of the running one (pip and setuptools too) through a
path file, and pip installs only hetbatch, without build isolation or an index: fast, and it
needs no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.jobutil import make_input, sim_job, sim_pool, write_job

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


def _venv_with_hetbatch(tmp_path: Path) -> Path:
    src = tmp_path / "src"  # only what a source distribution holds: no slurm/, no tests/
    shutil.copytree(REPO / "hetbatch", src / "hetbatch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   env=_clean_env())
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip()
    reused = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "reused-packages.pth").write_text("\n".join(sorted(reused)) + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", str(src)],
        capture_output=True, text=True, env=_clean_env(),
    )
    assert install.returncode == 0, install.stderr
    return venv


def test_installed_package_submits_a_dry_run(tmp_path: Path) -> None:
    venv = _venv_with_hetbatch(tmp_path)
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import hetbatch; print(hetbatch.__file__)"],
        capture_output=True, text=True, env=_clean_env(), cwd=tmp_path,
    )
    assert where.stdout.startswith(str(venv)), where  # the installed copy, not the source tree
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 100),
                  [sim_pool("a", 1000), sim_pool("b", 1000, nodes=2)])
    result = subprocess.run(
        [venv / "bin" / "hetbatch", "submit", str(write_job(tmp_path / "job.yaml", job)),
         "--dry-run"],
        capture_output=True, text=True, cwd=tmp_path,
        env=_clean_env(PATH=f"{venv / 'bin'}:/usr/bin:/bin"),
    )
    assert result.returncode == 0, result.stderr
    names = [part.split("\n", 1)[0] for part in result.stdout.split("# ---- ")[1:]]
    assert names == ["coordinator.sbatch", "pool-a.sbatch", "pool-b.sbatch"]
    assert f"{venv / 'bin' / 'python'} -m hetbatch coordinate" in result.stdout
    assert "#SBATCH --array=0-1" in result.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
