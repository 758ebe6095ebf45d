"""Worker processes, one per instance, restarted when they fail: the same code starts the
workers of a local run and those of one Slurm node."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from tqdm import tqdm

from hetbatch.layout import InstanceSpec, device_env
from hetbatch.worker.loop import HUNG_EXIT, LIVENESS_ENV, RELAYOUT_EXIT
from hetbatch.worker.main import STOPPED_EXIT


def die_with_parent() -> None:
    """Workers must not outlive a killed launcher (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class WorkerState(Enum):
    RUNNING = "running"
    DONE = "done"  # exited cleanly, or after the job was done
    FAILED = "failed"  # exited with an error and no restarts left


@dataclass
class WorkerProcess:
    instance: InstanceSpec
    log_path: Path | None = None  # None: the worker writes to this process's stdout
    proc: subprocess.Popen | None = None
    restarts: int = 0
    state: WorkerState = WorkerState.RUNNING
    log: IO | None = field(default=None, repr=False)
    argv: list[str] | None = None  # None: the instance's worker; else this command
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's
    liveness: Path | None = None  # the file the worker touches every second once working


class WorkerSupervisor:
    """Starts one worker per instance and restarts those that fail, within a budget.

    `coordinator_args` tell a worker where the coordinator is (`--coordinator HOST:PORT`, or
    `--coordinator-file URL` to follow a coordinator that moves); `env` is the environment
    every worker starts from, to which each adds the variables that give it its devices.
    A working worker that stops touching its liveness file for `unresponsive_s` (stopped,
    frozen, swapped out) is killed, and so restarted like one that died.
    """

    def __init__(
        self,
        instances: list[InstanceSpec],
        coordinator_args: list[str],
        env: dict[str, str],
        max_restarts: int,
        log_dir: Path | None = None,
        unresponsive_s: float | None = None,
    ) -> None:
        self.workers = [
            WorkerProcess(i, log_dir / f"{i.instance_id}.log" if log_dir else None)
            for i in instances
        ]
        self.coordinator_args = coordinator_args
        self.env = env
        self.max_restarts = max_restarts
        self.unresponsive_s = unresponsive_s
        self._liveness_dir = Path(tempfile.mkdtemp(prefix="hetbatch-alive-"))

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)

    def _spawn(self, w: WorkerProcess) -> None:
        if w.log_path is not None and w.log is None:
            w.log = open(w.log_path, "ab")  # noqa: SIM115 (kept open for the child's life)
        self._note(w, f"started {w.instance.instance_id} on devices {list(w.instance.devices)}")
        w.state = WorkerState.RUNNING
        w.liveness = self._liveness_dir / f"{w.instance.instance_id}.alive"
        w.liveness.unlink(missing_ok=True)  # a new life: silent until its loop runs
        w.proc = subprocess.Popen(
            w.argv or self.worker_argv(w.instance),
            env={**self.env, **device_env(w.instance), **w.env, LIVENESS_ENV: str(w.liveness)},
            stdout=w.log,
            stderr=subprocess.STDOUT if w.log is not None else None,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def worker_argv(self, instance: InstanceSpec) -> list[str]:
        return [
            sys.executable,
            "-m",
            "hetbatch.worker",
            *self.coordinator_args,
            "--instance",
            instance.instance_id,
        ]

    def _note(self, w: WorkerProcess, line: str) -> None:
        """A line in the worker's own output (its log file, or stdout)."""
        if w.log is not None:
            w.log.write(f"{line}\n".encode())
            w.log.flush()
        else:
            print(line, flush=True)

    def reap(self, job_done: Callable[[], bool]) -> None:
        """Settle workers that exited: done if they ended cleanly or the job is done, else
        restarted while the budget lasts, else failed."""
        self._kill_unresponsive()
        for w in self.workers:
            if w.state is not WorkerState.RUNNING or w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            name = w.instance.instance_id
            how = _ending(code)
            if code == 0 or job_done():
                w.state = WorkerState.DONE
            elif code == RELAYOUT_EXIT:  # asked for, not a failure: the budget is untouched
                _say(f"worker {name} finished its units; restarting in the re-planned layout")
                self._spawn(w)
            elif w.restarts < self.max_restarts:
                w.restarts += 1
                _say(f"worker {name} {how}; restarting ({w.restarts}/{self.max_restarts})")
                self._spawn(w)
            else:
                _say(f"worker {name} {how}; no restarts left")
                w.state = WorkerState.FAILED

    def _kill_unresponsive(self) -> None:
        if self.unresponsive_s is None:
            return
        for w in self.workers:
            if w.state is not WorkerState.RUNNING or w.proc is None or w.liveness is None:
                continue
            try:
                silent_s = time.time() - w.liveness.stat().st_mtime
            except FileNotFoundError:
                continue  # still starting its engine
            if silent_s > self.unresponsive_s and w.proc.poll() is None:
                _say(f"worker {w.instance.instance_id} unresponsive for {silent_s:.0f} s "
                     "(stopped or frozen); killing it")
                w.proc.kill()
                w.proc.wait()
                w.liveness.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return any(w.state is WorkerState.RUNNING for w in self.workers)

    @property
    def failed(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.state is WorkerState.FAILED]

    def stop(self, grace_s: float) -> None:
        """Give live workers `grace_s` to leave by themselves, then terminate, then kill."""
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        deadline = time.monotonic() + grace_s
        for p in live:
            while p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for p in live:
            if p.poll() is None:
                p.terminate()
        for p in live:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for w in self.workers:
            if w.log is not None:
                w.log.close()
                w.log = None
        shutil.rmtree(self._liveness_dir, ignore_errors=True)


def _ending(code: int) -> str:
    """How a worker ended, for the line that says it will be restarted (or not)."""
    if code == STOPPED_EXIT:
        return "stopped on SIGTERM, its leases given back"
    if code == HUNG_EXIT:
        return "found its engine hung and gave its leases back"
    return f"exited ({code})"


def _say(line: str) -> None:
    """To stderr, above a progress bar if one is shown."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
