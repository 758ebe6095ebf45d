"""Where the CPU of a run goes, thread by thread: `hetbatch run` against bare vLLM's best setting.

Runs the overhead benchmark's long job (`bench/overhead.py`'s prompts and engine arguments) once
each way and samples every thread of every process of the run from /proc each second, keeping
each thread's last CPU time (user + system). Python thread names come from `py-spy dump` when
py-spy is installed (`pip install py-spy`), taken once a minute into the run; native threads stay
unnamed. What it answers: how much of the CPU a run takes is the engine's thread and how much
is everything beside it (reading, tokenizing, writing, the coordinator), which with an engine on
every core is taken from the engines.

    python bench/thread_cpu.py                   # 20,000 rows, two instances
    python bench/thread_cpu.py --rows 12000 --instances 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # the same job, sides and environments

TICK = os.sysconf("SC_CLK_TCK")
NAME_AFTER_S = 60.0


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


def watch(procs: list[subprocess.Popen], root: int) -> tuple[dict, dict, dict, float]:
    """Sample until every process ends: last CPU per (pid, tid), commands, thread names, wall."""
    cpu: dict[tuple[int, int], float] = {}
    commands: dict[int, str] = {}
    names: dict[tuple[int, int], str] = {}
    named: set[int] = set()
    t0 = time.monotonic()
    while any(p.poll() is None for p in procs):
        for pid in descendants(root):
            if pid == os.getpid():
                continue
            commands.setdefault(pid, command(pid))
            for tid, seconds in thread_cpu(pid).items():
                cpu[(pid, tid)] = seconds
            if pid not in named and time.monotonic() - t0 > NAME_AFTER_S:
                named.add(pid)
                names.update({(pid, t): n for t, n in python_names(pid).items()})
        time.sleep(1.0)
    return cpu, commands, names, time.monotonic() - t0


def report(label: str, cpu: dict, commands: dict, names: dict, wall: float) -> None:
    print(f"{label}: wall {wall:.1f} s")
    per_process: dict[int, float] = defaultdict(float)
    for (pid, tid), seconds in sorted(cpu.items()):
        per_process[pid] += seconds
        if seconds >= 0.05:
            name = names.get((pid, tid), "main" if tid == pid else "native or ended")
            print(f"  {pid:>7} {tid:>7}  {name:<18} {seconds:8.2f} s  {commands[pid]}")
    for pid, seconds in per_process.items():
        if seconds >= 0.5:
            mains = cpu.get((pid, pid), 0.0)
            print(f"  process {pid}: {seconds:.1f} CPU s, {mains:.1f} on its main thread, "
                  f"{seconds - mains:.1f} beside it  ({commands[pid]})")


def run_hetbatch(job: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hetbatch", "run", str(job), "--overwrite"],
                            env=overhead.BASE_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    report("hetbatch run", *watch([proc], proc.pid))
    if proc.returncode:
        raise SystemExit(f"hetbatch run failed with exit code {proc.returncode}")


def run_bare(job: Path, rows: int, instances: int) -> None:
    envs = overhead.BEST[instances]
    bounds = [rows * k // len(envs) for k in range(len(envs) + 1)]
    procs = [
        subprocess.Popen([sys.executable, "-c", overhead.BARE, str(job), str(a), str(b)],
                         env={**overhead.BASE_ENV, **env}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for env, a, b in zip(envs, bounds, bounds[1:], strict=False)
    ]
    report("bare vLLM, best setting", *watch(procs, os.getpid()))
    if any(p.returncode for p in procs):
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
