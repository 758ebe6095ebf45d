"""Run a whole job on this machine: the coordinator in this process, one worker process per
instance, a progress bar, and a clean shutdown on success, failure and Ctrl-C."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from hetbatch.coordinator.server import Coordinator
from hetbatch.engines.vllm_engine import vllm_version
from hetbatch.launch.base import Launcher, PreparedRun, log_dir
from hetbatch.layout import InstanceSpec, device_env
from hetbatch.report import summary_lines
from hetbatch.worker.main import TOKEN_ENV


def _die_with_parent() -> None:
    """Workers must not outlive a killed launcher (Linux: PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@dataclass
class WorkerProcess:
    instance: InstanceSpec
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    log: IO | None = field(default=None, repr=False)


class JobFailed(Exception):
    """The job could not finish (every worker failed); the ledger keeps what was committed."""


class LocalLauncher(Launcher):
    poll_s = 0.5

    def run(self, progress: bool = True) -> int:
        run = self.prepare()
        if run.already_complete:
            print(f"already complete: {run.total_rows:,} rows in {run.job.output.path}")
            return 0
        print(self._banner(run))
        coordinator = self.start_coordinator(run)
        workers = [WorkerProcess(i, log_dir(run) / f"{i.instance_id}.log") for i in run.instances]
        started = time.monotonic()
        try:
            for w in workers:
                self._spawn(w, coordinator)
            self._watch(run, coordinator, workers, progress)
        except KeyboardInterrupt:
            self._stop_all(workers, grace_s=5)
            done = coordinator.progress().rows_done
            print(
                f"\ninterrupted: {done:,} of {run.total_rows:,} rows committed; "
                "run the same command again to resume"
            )
            return 130
        finally:
            # Everything is committed once the coordinator has finished: workers get a moment
            # to leave cleanly, then are stopped rather than waited for.
            self._stop_all(workers, grace_s=0.5 if coordinator.finished.is_set() else 10)
            coordinator.stop()
        if coordinator.failure is not None:
            done = coordinator.progress().rows_done
            raise JobFailed(
                f"{coordinator.failure} ({done:,} of {run.total_rows:,} rows committed and kept)"
            )
        for line in summary_lines(
            run.store, coordinator.metrics_dict(), time.monotonic() - started
        ):
            print(line)
        return 0

    def _banner(self, run: PreparedRun) -> str:
        pools = ", ".join(
            f"{p.name} x{sum(1 for i in run.instances if i.pool == p.name)}"
            for p in run.job.cluster.pools
        )
        resumed = f", resuming with {run.committed_rows:,} done" if run.committed_rows else ""
        return (
            f"plan: {len(run.instances)} instances ({pools}), engine {_engine_name(run)}, "
            f"{run.total_rows:,} rows{resumed}"
        )

    def _spawn(self, w: WorkerProcess, coordinator: Coordinator) -> None:
        host, port = coordinator.address
        env = {**os.environ, **device_env(w.instance), TOKEN_ENV: self.token}
        if w.log is None:
            w.log = open(w.log_path, "ab")  # noqa: SIM115 (kept open for the child's life)
        w.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hetbatch.worker",
                "--coordinator",
                f"{host}:{port}",
                "--instance",
                w.instance.instance_id,
            ],
            env=env,
            stdout=w.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )

    def _watch(
        self,
        run: PreparedRun,
        coordinator: Coordinator,
        workers: list[WorkerProcess],
        progress: bool,
    ) -> None:
        bar = tqdm(
            total=run.total_rows,
            initial=run.committed_rows,
            unit="row",
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        t0, tokens0 = time.monotonic(), coordinator.progress().completion_tokens
        try:
            while not coordinator.finished.wait(self.poll_s):
                self._reap(workers, coordinator)
                p = coordinator.progress()
                bar.update(p.rows_done - bar.n)
                elapsed = max(time.monotonic() - t0, 1e-6)
                bar.set_postfix_str(
                    _postfix(p, (p.completion_tokens - tokens0) / elapsed), refresh=False
                )
            bar.update(coordinator.progress().rows_done - bar.n)
        finally:
            bar.close()

    def _reap(self, workers: list[WorkerProcess], coordinator: Coordinator) -> None:
        """Restart workers that died, within the job's restart budget."""
        for w in workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            code = w.proc.returncode
            if code == 0 and coordinator.finished.is_set():
                continue
            if w.restarts < self.job.launch.max_worker_restarts:
                w.restarts += 1
                print(
                    f"\nworker {w.instance.instance_id} exited ({code}); restarting "
                    f"({w.restarts}/{self.job.launch.max_worker_restarts})",
                    file=sys.stderr,
                )
                self._spawn(w, coordinator)
            else:
                w.proc = None
        if all(w.proc is None for w in workers):
            raise JobFailed(_failure_message(workers))

    def _stop_all(self, workers: list[WorkerProcess], grace_s: float) -> None:
        live = [w.proc for w in workers if w.proc is not None and w.proc.poll() is None]
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
        for w in workers:
            if w.log is not None:
                w.log.close()
                w.log = None


def _postfix(p, tokens_per_s: float) -> str:
    shares = []
    total = max(p.rows_done, 1)
    for name, m in p.instances.items():
        shares.append(f"{name} {100 * m['rows'] / total:.0f}%")
    return f"{tokens_per_s:,.0f} out tok/s | " + " ".join(shares)


def _failure_message(workers: list[WorkerProcess]) -> str:
    w = workers[-1]
    try:
        tail = w.log_path.read_text(errors="replace").strip().splitlines()[-15:]
    except OSError:
        tail = []
    return f"every worker failed; last log ({w.log_path}):\n  " + "\n  ".join(tail)


def _engine_name(run: PreparedRun) -> str:
    if run.job.engine.kind == "sim":
        return "sim"
    return f"vllm {vllm_version() or '(not installed)'}"
