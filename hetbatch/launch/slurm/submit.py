"""`hetbatch submit`: validate like `run`, then hand the job to Slurm as a coordinator job and
one job (or job array) per pool. Submitting again submits only what is no longer queued or
running, so a killed coordinator is replaced without touching the workers that still run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from hetbatch.coordinator.ledger import OutputStore
from hetbatch.errors import UserError
from hetbatch.io.paths import OutputPaths
from hetbatch.launch.base import Launcher, PreparedRun
from hetbatch.launch.slurm import commands
from hetbatch.launch.slurm.scripts import Script, render, render_hetjob
from hetbatch.spec import JobSpec


def read_record(store: OutputStore) -> list[dict[str, Any]]:
    """Jobs submitted for this output so far (`_hetbatch/slurm.json`), oldest first."""
    if not store.paths.files.exists(OutputPaths.SLURM_RECORD):
        return []
    return list(store.read_json(OutputPaths.SLURM_RECORD).get("jobs", []))


def live_jobs(store: OutputStore) -> dict[str, list[dict[str, Any]]]:
    """Recorded jobs that Slurm still runs or queues, by role (`coordinator` or a pool name)."""
    jobs = read_record(store)
    if not jobs:
        return {}
    active = {commands.base_id(s.job_id) for s in commands.squeue([j["id"] for j in jobs])
              if s.active}
    live: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        if j["id"] in active:
            for role in _roles(j):
                live.setdefault(role, []).append(j)
    return live


def _roles(job: dict[str, Any]) -> list[str]:
    if job["role"] == "hetjob":
        return ["coordinator", *job.get("pools", [])]
    return [job["pool"]] if job["role"] == "pool" else ["coordinator"]


class SlurmLauncher(Launcher):
    """Submits a job to Slurm; the coordinator and the workers run inside allocations."""

    def __init__(
        self, job: JobSpec, overwrite: bool = False, calibration: str | None = None
    ) -> None:
        super().__init__(job, overwrite, calibration)
        self.hetjob = False
        self._live: dict[str, list[dict[str, Any]]] = {}  # submitted jobs still queued or running
        self._fresh = False  # nothing of this job was written before this submission

    def submit(self, dry_run: bool = False, hetjob: bool = False) -> int:
        """Submit what of the job is not queued or running already (everything, at first)."""
        if not dry_run:
            commands.require_sbatch()
        store = OutputStore(self.job.output.path)
        self._live = {} if dry_run and self.overwrite else self._live_jobs(store)
        if self._live and self.overwrite:
            raise UserError(
                f"{self.job.output.path}: jobs of this output are still queued or running; "
                "`hetbatch cancel` them before --overwrite"
            )
        self._fresh = not store.exists()
        self.hetjob = hetjob
        return self.execute(dry_run=dry_run)

    def launch(self, run: PreparedRun) -> int:
        """Render the scripts and sbatch them (with a dry run, only print them)."""
        live = self._live
        scripts = self._scripts(run, live, self.hetjob)
        if run.dry_run:
            for s in scripts:
                print(f"# ---- {s.name}.sbatch\n{s.text}")
            return 0
        if not scripts:
            print("every part of this job is already queued or running; nothing submitted")
            return 0
        self._write_token(run.store)
        if "coordinator" not in live:
            _remove(run.store, OutputPaths.COORDINATOR)  # workers wait for the new one's
        try:
            submitted = self._submit_all(run.store, scripts)
        except UserError:
            if self._fresh:  # a refused first submission leaves no output behind
                run.store.wipe()
                with contextlib.suppress(OSError):
                    run.store.fs.rmdir(run.store.root)
            raise
        for script, job_id in submitted:
            print(f"submitted {script.name}: Slurm job {job_id}")
        print(f"{run.total_rows:,} rows, {run.committed_rows:,} done; follow with "
              f"`hetbatch status {run.job.output.path}`")
        return 0

    def _live_jobs(self, store: OutputStore) -> dict[str, list[dict[str, Any]]]:
        return live_jobs(store) if store.exists() else {}

    def _scripts(
        self, run: PreparedRun, live: dict[str, list[dict[str, Any]]], hetjob: bool
    ) -> list[Script]:
        logs = str(slurm_log_dir(run.store))
        if hetjob:
            if live:
                raise UserError(
                    f"{run.job.output.path}: parts of this job still run; resubmit without "
                    "--hetjob to add only what is missing"
                )
            return [render_hetjob(run.job, logs)]
        missing = [p.name for p in run.job.cluster.pools if p.name not in live]
        return render(
            run.job, run.instances, logs, pools=missing, coordinator="coordinator" not in live
        )

    def _write_token(self, store: OutputStore) -> None:
        """Workers read the job token from `_hetbatch/token` (owner-only), never from argv.

        A resubmission keeps the token of the jobs still running."""
        files, path = store.paths.files, store.path(OutputPaths.TOKEN)
        if files.exists(OutputPaths.TOKEN) and not self.overwrite:
            self.token = files.read_text(OutputPaths.TOKEN).strip() or self.token
            return
        if store.local:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.token)
            os.chmod(path, 0o600)
        else:
            files.write_text(OutputPaths.TOKEN, self.token)

    def _submit_all(self, store: OutputStore, scripts: list[Script]) -> list[tuple[Script, str]]:
        """sbatch each script; on any failure cancel what this call submitted, then raise."""
        folder = script_dir(store)
        slurm_log_dir(store).mkdir(parents=True, exist_ok=True)  # Slurm does not create it
        submitted: list[tuple[Script, str]] = []
        try:
            for script in scripts:
                path = folder / f"{script.name}.sbatch"
                path.write_text(script.text)
                job_id = commands.sbatch(str(path))
                submitted.append((script, job_id))
                _record(store, script, job_id)
        except BaseException:
            ids = [job_id for _, job_id in submitted]
            commands.scancel(ids)
            commands.wait_gone(ids)
            _unrecord(store, ids)
            raise
        return submitted


def cancel(output: str) -> list[str]:
    """scancel every job submitted for OUTPUT that still runs or waits; their ids."""
    store = OutputStore(output)
    if not store.exists():
        raise UserError(f"{output}: no hetbatch job has written here")
    ids = sorted({j["id"] for jobs in live_jobs(store).values() for j in jobs}, key=int)
    commands.scancel(ids)
    return ids


def cancel_pending(store: OutputStore) -> None:
    """Withdraw worker jobs still waiting in the queue: the job needs them no more."""
    ids = [j["id"] for j in read_record(store) if j["role"] == "pool"]
    if ids:
        commands.scancel(ids, pending_only=True)


def slurm_log_dir(store: OutputStore) -> Path:
    """Slurm writes job output beside the ledger on local outputs, else under the cwd."""
    return store.paths.local_dir(OutputPaths.LOGS) or Path.cwd() / "hetbatch-slurm-logs"


def script_dir(store: OutputStore) -> Path:
    """Submitted scripts are kept in `_hetbatch/slurm/` for reading and resubmitting by hand."""
    path = store.paths.local_dir(OutputPaths.SLURM_SCRIPTS) or Path(tempfile.mkdtemp())
    path.mkdir(parents=True, exist_ok=True)
    return path


def _record(store: OutputStore, script: Script, job_id: str) -> None:
    entry: dict[str, Any] = {"id": job_id, "role": script.role, "submitted": time.time()}
    if script.pool is not None:
        entry["pool"] = script.pool
    if script.role == "hetjob":
        entry["pools"] = [p.name for p in _job_pools(store)]
    store.write_json(OutputPaths.SLURM_RECORD, {"jobs": [*read_record(store), entry]})


def _unrecord(store: OutputStore, job_ids: list[str]) -> None:
    if job_ids:
        kept = [j for j in read_record(store) if j["id"] not in job_ids]
        store.write_json(OutputPaths.SLURM_RECORD, {"jobs": kept})


def _job_pools(store: OutputStore) -> list[Any]:
    from hetbatch.spec import parse_job

    return parse_job(store.read_json(OutputPaths.JOB)["spec"]).cluster.pools


def _remove(store: OutputStore, name: str) -> None:
    if store.paths.files.exists(name):
        store.paths.files.rm(name)
