"""Where the CPU of a run goes, thread by thread: `hetbatch run` against bare vLLM's best setting.

Runs the overhead benchmark's long job (`bench/overhead.py`'s prompts and engine arguments) once
each way and samples every thread of every process of the run from /proc each second, keeping
each thread's last CPU time (user + system). Python thread names come from `py-spy dump` when
py-spy is installed (`pip install py-spy`), taken once a minute into the run; native threads stay
unnamed. What it answers: how much of the CPU a run takes is the engines' threads and how much
is everything beside them (reading, tokenizing, writing, the coordinator), which with an engine
on every core is taken from the engines; printed as a share of the engines' threads, with the
threads that ended while their process ran (start-up work, e.g. importing vLLM) apart.

    python bench/thread_cpu.py                   # 20,000 rows, two instances
    python bench/thread_cpu.py --rows 12000 --instances 1

The split assumes engines in the workers' processes (two instances here); with the engine core in
a process of its own (one instance here) every process's main thread counts as main.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the same job, sides and environments

TICK = os.sysconf("SC_CLK_TCK")
NAME_AFTER_S = 60.0
EARLY_S = 10.0  # a thread that ended this long before its process did ran start-up work


@dataclass
class Sample:
    """Last CPU seconds seen per (pid, tid), and what is known of them."""

    cpu: dict[tuple[int, int], float] = field(default_factory=dict)
    ended_at: dict[tuple[int, int], float] = field(default_factory=dict)  # gone, process alive
    last_seen: dict[int, float] = field(default_factory=dict)  # per process
    commands: dict[int, str] = field(default_factory=dict)
    names: dict[tuple[int, int], str] = field(default_factory=dict)  # Python thread names
    wall_s: float = 0.0
    root: int = 0  # the launcher: its main thread runs no engine


def descendants(root: int) -> list[int]:
    """Every live process under `root`, itself included."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sorted(tree)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid` (empty once it has exited)."""
    out = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / TICK
    except OSError:
        pass
    return out


def command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    args = raw.decode(errors="replace").split("\0")
    return " ".join(a for a in args if a)[:60].replace("\n", " ")


def python_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name, from py-spy if it is installed."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    names = {}
    for line in dump.splitlines():
        if line.startswith("Thread ") and '"' in line:
            tid = line.split()[1]
            if tid.isdigit():
                names[int(tid)] = line.split('"')[1]
    return names


def watch(procs: list[subprocess.Popen], root: int) -> Sample:
    """Sample every thread under `root` each second until every process in `procs` ends."""
    sample = Sample(root=root)
    named: set[int] = set()
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        for pid in descendants(root):
            if pid == os.getpid():
                continue
            sample.commands.setdefault(pid, command(pid))
            now = thread_cpu(pid)
            if now:
                at = time.monotonic()
                sample.last_seen[pid] = at
                seen = {tid for p, tid in sample.cpu if p == pid}
                for tid in seen - now.keys():
                    sample.ended_at.setdefault((pid, tid), at)
            sample.cpu.update({(pid, tid): seconds for tid, seconds in now.items()})
            if pid not in named and time.monotonic() - t0 > NAME_AFTER_S:
                named.add(pid)
                sample.names.update({(pid, t): n for t, n in python_names(pid).items()})
        time.sleep(1.0)
    sample.wall_s = time.monotonic() - t0
    return sample


def ended_early(sample: Sample, pid: int, tid: int) -> bool:
    """Gone while its process ran on for a while: start-up work, not the process's shutdown."""
    at = sample.ended_at.get((pid, tid))
    return at is not None and sample.last_seen.get(pid, at) - at > EARLY_S


def report(label: str, sample: Sample) -> None:
    """Every thread that used CPU, then the run's split: the workers' main threads (where an
    in-process engine steps) against the work beside them, threads that ended early apart."""
    print(f"{label}: wall {sample.wall_s:.1f} s")
    main = beside = early = 0.0
    for (pid, tid), seconds in sorted(sample.cpu.items()):
        if tid == pid and pid != sample.root:
            main += seconds
        elif ended_early(sample, pid, tid):
            early += seconds
        else:
            beside += seconds
        if seconds >= 0.05:
            name = sample.names.get((pid, tid), "main" if tid == pid else "native")
            if ended_early(sample, pid, tid):
                name += " (ended early)"
            print(f"  {pid:>7} {tid:>7}  {name:<24} {seconds:8.2f} s  {sample.commands[pid]}")
    print(f"  main threads {main:.1f} CPU s; beside them {beside:.1f} s "
          f"({beside / max(main, 1e-9):.1%} of the main threads'), and {early:.1f} s in threads "
          "that ended early")


def run_hetbatch(job: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hetbatch", "run", str(job), "--overwrite"],
                            env=overhead.BASE_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    report("hetbatch run", watch([proc], proc.pid))
    if proc.returncode:
        raise SystemExit(f"hetbatch run failed with exit code {proc.returncode}")


def run_bare(job: Path, rows: int, instances: int) -> None:
    procs = overhead.start_bare(job, rows, overhead.BEST[instances])
    report("bare vLLM, best setting", watch(procs, os.getpid()))
    if any(p.wait() for p in procs):  # each prints one result line: its pipe cannot fill
        raise SystemExit("bare vLLM failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--instances", type=int, choices=sorted(overhead.BEST), default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        job = overhead.make_job(Path(tmp), "long", args.rows, args.instances, args.max_tokens)
        run_hetbatch(job)
        run_bare(job, args.rows, args.instances)


if __name__ == "__main__":
    main()
