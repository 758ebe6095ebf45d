"""Run a whole job on this machine: the coordinator in this process, one worker process per
instance, a progress bar, and a clean shutdown on success, failure and Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from tqdm import tqdm

from hetbatch.coordinator.server import Coordinator
from hetbatch.engines.factory import preload_env
from hetbatch.engines.vllm_engine import vllm_version
from hetbatch.launch.base import Launcher, PreparedRun, log_dir
from hetbatch.launch.span import free_port, span_processes
from hetbatch.launch.workers import WorkerProcess, WorkerSupervisor
from hetbatch.worker.main import TOKEN_ENV


class JobFailed(Exception):
    """The job could not finish (every worker failed); the ledger keeps what was committed."""


class LocalLauncher(Launcher):
    poll_s = 0.5
    progress = True

    def run(self, progress: bool = True) -> int:
        self.progress = progress
        return self.execute()

    def launch(self, run: PreparedRun) -> int:
        print(self._banner(run))
        coordinator = self.start_coordinator(run)
        host, port = coordinator.address
        logs = log_dir(run)
        workers = WorkerSupervisor(
            run.instances,
            ["--coordinator", f"{host}:{port}"],
            {**preload_env(self.job), **os.environ, TOKEN_ENV: self.token},
            self.job.launch.max_worker_restarts,
            logs,
            unresponsive_s=self.job.engine.hang_timeout_s,
        )
        _stand_in_nodes(workers, run, logs)
        started = time.monotonic()
        try:
            workers.start()
            self._watch(run, coordinator, workers)
        except KeyboardInterrupt:
            workers.stop(grace_s=5)
            done = coordinator.progress().rows_done
            print(
                f"\ninterrupted: {done:,} of {run.total_rows:,} rows committed; "
                "run the same command again to resume"
            )
            return 130
        finally:
            # Everything is committed once the coordinator has finished: workers get a moment
            # to leave cleanly, then are stopped rather than waited for.
            workers.stop(grace_s=0.5 if coordinator.finished.is_set() else 10)
            coordinator.stop()
        if coordinator.failure is not None:
            done = coordinator.progress().rows_done
            raise JobFailed(
                f"{coordinator.failure} ({done:,} of {run.total_rows:,} rows committed and kept)"
            )
        self.print_summary(run, coordinator, started)
        return 0

    def _banner(self, run: PreparedRun) -> str:
        pools = ", ".join(
            f"{p.name} x{sum(1 for i in run.instances if i.pool == p.name)}"
            for p in run.job.cluster.pools
        )
        resumed = f", resuming with {run.committed_rows:,} done" if run.committed_rows else ""
        window = run.prefix_window_rows
        order = f", prefix order in windows of {window:,} rows" if window else ""
        return (
            f"plan: {len(run.instances)} instances ({pools}), engine {_engine_name(run)}, "
            f"{run.total_rows:,} rows{order}{resumed}"
        )

    def _watch(
        self, run: PreparedRun, coordinator: Coordinator, workers: WorkerSupervisor
    ) -> None:
        bar = tqdm(
            total=run.total_rows,
            initial=run.committed_rows,
            unit="row",
            disable=not self.progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        t0, tokens0 = time.monotonic(), coordinator.progress().completion_tokens
        try:
            while not coordinator.finished.wait(self.poll_s):
                workers.reap(coordinator.finished.is_set)
                for w in workers.failed:  # rows no longer wait for its engine to join
                    coordinator.instance_failed(w.instance.instance_id)
                if not workers.running and not coordinator.finished.is_set():
                    raise JobFailed(_failure_message(workers.workers))
                p = coordinator.progress()
                bar.update(p.rows_done - bar.n)
                elapsed = max(time.monotonic() - t0, 1e-6)
                bar.set_postfix_str(
                    _postfix(p, (p.completion_tokens - tokens0) / elapsed), refresh=False
                )
            bar.update(coordinator.progress().rows_done - bar.n)
        finally:
            bar.close()


def _stand_in_nodes(workers: WorkerSupervisor, run: PreparedRun, logs: Path) -> None:
    """Instances that span nodes run here as one process per node, all on this machine."""
    processes = []
    for w in workers.workers:
        if not w.instance.spans_nodes:
            processes.append(w)
            continue
        head = ("127.0.0.1", free_port(), free_port())
        processes += span_processes(
            w.instance, list(range(w.instance.nodes)), workers.worker_argv(w.instance), head,
            run.job.output.path, logs, stand_in=True,
        )
    workers.workers = processes


def _postfix(p, tokens_per_s: float) -> str:
    shares = []
    total = max(p.rows_done, 1)
    for name, m in p.instances.items():
        shares.append(f"{name} {100 * m['rows'] / total:.0f}%")
    return f"{tokens_per_s:,.0f} out tok/s | " + " ".join(shares)


def _failure_message(workers: list[WorkerProcess]) -> str:
    log = workers[-1].log_path
    tail: list[str] = []
    if log is not None:
        with contextlib.suppress(OSError):
            tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    return f"every worker failed; last log ({log}):\n  " + "\n  ".join(tail)


def _engine_name(run: PreparedRun) -> str:
    if run.job.engine.kind == "sim":
        return "sim"
    return f"vllm {vllm_version() or '(not installed)'}"
