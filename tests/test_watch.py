"""`hetbatch status OUT --watch` in a real terminal (tmux): it refreshes while a job runs, shows
an instance that stopped committing, quits cleanly on Ctrl-C, and ends by itself with the job."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.jobutil import (
    busy_worker,
    ledger,
    make_input,
    sim_job,
    sim_pool,
    start_run,
    wait_for,
    write_job,
)


class Terminal:
    """A detached tmux session on its own server, running one command."""

    def __init__(self, command: list[str]) -> None:
        assert shutil.which("tmux"), "tmux is missing (Debian package tmux)"
        self.socket = f"hetbatch-test-{uuid.uuid4().hex[:8]}"
        env = {k: os.environ[k] for k in ("PYTHONPATH", "PATH", "HOME") if k in os.environ}
        shell = (f"env {shlex.join(f'{k}={v}' for k, v in env.items())} {shlex.join(command)}; "
                 "echo EXIT=$?; sleep 60")
        self._tmux("new-session", "-d", "-s", "t", "-x", "130", "-y", "45", shell)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@contextmanager
def terminal(command: list[str]) -> Iterator[Terminal]:
    term = Terminal(command)
    try:
        yield term
    finally:
        term.close()


def _watch(out: Path) -> list[str]:
    return [sys.executable, "-m", "hetbatch", "status", str(out), "--watch", "--interval", "0.3"]


def _instance_line(screen: str, instance: str) -> str:
    return next((line for line in screen.splitlines() if instance in line), "")


def test_watch_shows_a_silent_instance_and_quits_on_ctrl_c(tmp_path) -> None:
    job = sim_job(
        tmp_path, make_input(tmp_path / "in.parquet", 10_000),
        [sim_pool("a", 4_000), sim_pool("b", 4_000)],
        launch={"max_worker_restarts": 0}, scheduler={"max_unit_rows": 300},
    )
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 2)
    try:
        with terminal(_watch(out)) as term:
            wait_for(lambda: "running" in term.screen() and "a-0-0" in term.screen()
                     and "b-0-0" in term.screen(), 30, "the live view")
            first = term.screen()
            assert "rows/s" in first and "ETA" in first and "pools" in first
            assert "working" in _instance_line(first, "a-0-0")
            victim = ledger(out)[-1]["instance"]
            os.kill(busy_worker(proc.pid, out), signal.SIGKILL)
            wait_for(lambda: "silent" in _instance_line(term.screen(), victim), 30,
                     f"{victim} shown as silent")
            assert "working" in _instance_line(term.screen(), {"a-0-0": "b-0-0"}.get(
                victim, "a-0-0"))
            term.keys("C-c")
            wait_for(lambda: "EXIT=0" in term.screen(), 10, "a clean exit on Ctrl-C")
            assert "Traceback" not in term.screen()
    finally:
        proc.kill()
        proc.wait()


def test_watch_ends_with_the_job(tmp_path) -> None:
    job = sim_job(tmp_path, make_input(tmp_path / "in.parquet", 3_000),
                  [sim_pool("a", 8_000), sim_pool("b", 4_000)])
    out = tmp_path / "out"
    proc = start_run(write_job(tmp_path / "job.yaml", job), out, 1)
    with terminal(_watch(out)) as term:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
        wait_for(lambda: "EXIT=0" in term.screen(), 20, "the view to end with the job")
        screen = term.screen()
        assert "complete" in screen and "3,000 of 3,000 rows (100.0%)" in screen
        assert "done" in _instance_line(screen, "a-0-0")
