"""Thin wrappers over sbatch, squeue and scancel, with errors a user can act on."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

from hetbatch.errors import UserError

# States of a job that still holds or waits for resources.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "CONFIGURING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
        "STOPPED",
    }
)


class SlurmUnavailable(UserError):
    """Slurm cannot be reached from here: not installed, or its controller does not answer."""

    exit_code = 1


class SubmissionRefused(UserError):
    """sbatch refused a script: usually a partition, account or resource the job file names."""


@dataclass(frozen=True)
class JobState:
    job_id: str  # as squeue prints it: 12, or 12_3 for an array task
    name: str
    state: str
    reason: str

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def slurm_env() -> dict[str, str]:
    """The environment jobs inherit from sbatch, without preloads an engine set for itself."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmUnavailable(f"{name} not found on PATH: is Slurm installed on this machine?")
    return path


def _run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_binary(args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=slurm_env(),
        )
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{args[0]} did not answer within {timeout:.0f} s") from None


def require_sbatch() -> None:
    _binary("sbatch")


def sbatch(script_path: str) -> str:
    """Submit one script; the job id."""
    result = _run(["sbatch", "--parsable", script_path])
    if result.returncode != 0:
        message = " ".join(
            line.removeprefix("sbatch: error: ")
            for line in result.stderr.strip().splitlines()
            if line.strip()
        )
        if "unable to contact" in message.lower() or "connection refused" in message.lower():
            raise SlurmUnavailable(f"sbatch: {message}")
        raise SubmissionRefused(f"sbatch refused {os.path.basename(script_path)}: {message}")
    return result.stdout.strip().split(";")[0]


def squeue(job_ids: list[str]) -> list[JobState]:
    """States of the given jobs (array tasks one by one); jobs Slurm has forgotten are left out."""
    if not job_ids:
        return []
    result = _run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%R", "-j", ",".join(job_ids)], timeout=30
    )
    states = []
    for line in result.stdout.splitlines():
        parts = line.split("|", 3)
        if len(parts) == 4:
            job_id, name, state, reason = parts
            states.append(JobState(job_id, name, state, reason.strip("()")))
    return states


def scancel(job_ids: list[str], pending_only: bool = False) -> None:
    """Cancel jobs; already finished ones are ignored."""
    if not job_ids:
        return
    args = ["scancel", *(["--state=PENDING"] if pending_only else []), *job_ids]
    _run(args, timeout=30)


def wait_gone(job_ids: list[str], timeout_s: float = 15.0) -> None:
    """Wait until cancelled jobs no longer run, so nothing of theirs writes after we clean up."""
    deadline = time.monotonic() + timeout_s
    while job_ids and time.monotonic() < deadline:
        if not any(s.active for s in squeue(job_ids)):
            return
        time.sleep(0.2)


def base_id(job_id: str) -> str:
    """The job id of an array task (`12_3` -> `12`), for matching squeue lines to submissions."""
    return job_id.split("_", 1)[0].split("+", 1)[0]
