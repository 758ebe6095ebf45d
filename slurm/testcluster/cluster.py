"""A real Slurm cluster on loopback, for tests and CI.

One machine runs its own munged, one slurmctld and one slurmd per node, every file they need
(config, key, state, spool, logs, pid files, fake GPU devices) kept in one state directory, so
nothing under /etc/slurm or /etc/munge is used and several clusters can run side by side.
Clients find the cluster through ``SLURM_CONF`` (see :attr:`LoopbackSlurm.env`).

Needs root (mknod for the fake GPUs, slurmd running jobs as their users) and Debian's
``munge slurmctld slurmd slurm-client`` (``.ci/install-test-packages.sh``).

CLI::

    python slurm/testcluster/cluster.py start DIR   # prints the export line for SLURM_CONF
    python slurm/testcluster/cluster.py status DIR
    python slurm/testcluster/cluster.py stop DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Character devices with the NVIDIA major number: Slurm only binds GPUs whose File= is a real
# device node; plain files give an empty CUDA_VISIBLE_DEVICES.
NVIDIA_MAJOR = 195

# Unix socket paths (munge's, and the step sockets slurmd makes in its spool) must stay under
# 108 bytes; keeping the state directory short leaves room for the longest of them.
MAX_STATE_DIR_LEN = 60

DAEMON_BINARIES = ("munged", "munge", "mungekey", "slurmctld", "slurmd")
CLIENT_BINARIES = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")

TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmClusterError(RuntimeError):
    """The test cluster failed to start, stop or answer; the message carries the log tails."""


@dataclass(frozen=True)
class NodeSpec:
    """One slurmd: its name, typed GPUs and the resources it declares.

    CPUs and memory may exceed the machine's (``SlurmdParameters=config_overrides``) so that
    several small jobs run at once on a 2-core machine.
    """

    name: str
    gpus: tuple[tuple[str, int], ...] = ()
    cpus: int = 4
    memory_mb: int = 4000

    @property
    def gres(self) -> str:
        """The node's ``Gres=`` value, e.g. ``gpu:a100:1,gpu:l40s:1``."""
        return ",".join(f"gpu:{kind}:{count}" for kind, count in self.gpus)


DEFAULT_NODES: tuple[NodeSpec, ...] = (
    NodeSpec("n1", (("a100", 2),)),
    NodeSpec("n2", (("l40s", 2),)),
    NodeSpec("n3", (("a100", 1), ("l40s", 1))),
)

# Every node is in both; "cpu" is the default. Any other name is an invalid partition.
PARTITIONS: tuple[str, ...] = ("cpu", "gpu")

DEF_MEM_PER_CPU_MB = 250


@dataclass(frozen=True)
class JobResult:
    """Final state of a job; for a heterogeneous job, of all its components together.

    ``state`` is ``COMPLETED`` only if every component completed, otherwise the first other
    state; ``exit_code`` is the largest component exit code.
    """

    job_id: int
    state: str
    exit_code: int
    signal: int
    records: tuple[dict[str, str], ...] = field(default=(), repr=False)

    @property
    def nodes(self) -> list[str]:
        """NodeList of each component, in component order."""
        return [r.get("NodeList", "") for r in self.records]


@dataclass(frozen=True)
class ClusterStatus:
    """Daemons expected, those alive (name -> pid), and ``sinfo`` lines (node partition state
    gres), so the CLI and tests can tell a half-started cluster from a running one.
    """

    expected: tuple[str, ...]
    daemons: dict[str, int]
    sinfo: tuple[str, ...]

    @property
    def running(self) -> bool:
        """True when every expected daemon is alive."""
        return all(name in self.daemons for name in self.expected)

    def __str__(self) -> str:
        lines = [
            f"{name:12} "
            + (f"running pid {self.daemons[name]}" if name in self.daemons else "stopped")
            for name in self.expected
        ]
        lines.extend(f"  {line}" for line in self.sinfo)
        return "\n".join(lines)


def find_binary(name: str) -> str | None:
    """Locate a Slurm or munge binary; daemons live in /usr/sbin, often not on a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def missing_binaries() -> list[str]:
    """Names of the daemons and clients that are not installed."""
    return [b for b in (*DAEMON_BINARIES, *CLIENT_BINARIES) if find_binary(b) is None]


def parse_scontrol_record(line: str) -> dict[str, str]:
    """Parse one ``scontrol -o`` line into a dict (values that contain spaces are cut short)."""
    return dict(re.findall(r"(\S+?)=(\S*)", line))


def _free_ports(count: int) -> list[int]:
    """Ports the kernel hands out as free on 127.0.0.1 right now (sockets held until all chosen)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _process_alive(pid: int) -> bool:
    """True if ``pid`` runs; a zombie counts as gone (PID 1 here may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _runs_binary(pid: int, name: str) -> bool:
    """True if ``pid`` executes ``name``, so a stale pid file never gets another process killed.

    Debian installs the daemons as alternatives: /usr/sbin/slurmd points to slurmd-wlm.
    """
    try:
        exe = Path(os.readlink(f"/proc/{pid}/exe")).name
    except OSError:
        return False
    return exe == name or exe.startswith(f"{name}-")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


class LoopbackSlurm:
    """Start, query and stop a multi-node Slurm cluster living in ``state_dir``.

    Use as a context manager or call :meth:`start` / :meth:`stop`. :meth:`stop` also works from
    another process (it reads the pid files), which is what the CLI relies on.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        nodes: Sequence[NodeSpec] = DEFAULT_NODES,
        partitions: Sequence[str] = PARTITIONS,
        cluster_name: str = "hetbatch",
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.nodes = tuple(nodes)
        self.partitions = tuple(partitions)
        self.cluster_name = cluster_name
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---- paths -------------------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        """The generated slurm.conf (gres.conf sits beside it, where Slurm looks for it)."""
        return self.state_dir / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.state_dir / "munge" / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    def _pid_files(self) -> dict[str, Path]:
        """Daemon name -> pid file, in the order to stop them (munged last: the others need it)."""
        run = self.state_dir / "run"
        files = {f"slurmd-{n.name}": run / f"slurmd-{n.name}.pid" for n in self.nodes}
        files["slurmctld"] = run / "slurmctld.pid"
        files["munged"] = self.state_dir / "munge" / "munged.pid"
        return files

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients: the caller's, pointed at this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    # ---- configuration -----------------------------------------------------------------

    def _check_state_dir(self) -> None:
        if len(str(self.state_dir)) > MAX_STATE_DIR_LEN:
            raise SlurmClusterError(
                f"state dir {self.state_dir} is longer than {MAX_STATE_DIR_LEN} characters; "
                "munge and slurmd socket paths would overflow 108 bytes (use a dir in /tmp)"
            )
        # munged refuses a socket in a directory that others cannot traverse.
        for parent in self.state_dir.parents:
            if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
                raise SlurmClusterError(
                    f"{parent} is not traversable by others (mode "
                    f"{stat.filemode(parent.stat().st_mode)}); munged needs o+x on every "
                    "parent of its socket (use a dir in /tmp)"
                )

    def write_config(self) -> None:
        """Create the state directory tree, munge key, fake GPU devices and config files."""
        self._check_state_dir()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        for sub in ("etc", "run", "log", "ctld", "spool", "dev"):
            (self.state_dir / sub).mkdir(exist_ok=True)
        munge_dir = self.state_dir / "munge"
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # clients of any user must reach the socket
        key = munge_dir / "munge.key"
        if not key.exists():
            self._run_checked([self._bin("mungekey"), "--create", f"--keyfile={key}"])
        key.chmod(0o600)

        gres_lines = ["AutoDetect=off"]
        for node in self.nodes:
            (self.state_dir / "spool" / node.name).mkdir(exist_ok=True)
            dev_dir = self.state_dir / "dev" / node.name
            dev_dir.mkdir(exist_ok=True)
            index = 0
            for kind, count in node.gpus:
                for minor in range(index, index + count):
                    device = dev_dir / f"nvidia{minor}"
                    if not device.exists():
                        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, minor))
                files = (
                    f"{dev_dir}/nvidia{index}"
                    if count == 1
                    else f"{dev_dir}/nvidia[{index}-{index + count - 1}]"
                )
                gres_lines.append(f"NodeName={node.name} Name=gpu Type={kind} File={files}")
                index += count

        ports = _free_ports(1 + len(self.nodes))
        d = self.state_dir
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ports[0]}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            # No cgroups: nothing here may rely on systemd or a delegated cgroup tree.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            # Without DefMemPerCPU every job takes a whole node and jobs run one at a time.
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={DEF_MEM_PER_CPU_MB}",
            # Nodes declare more CPUs and memory than the machine has.
            "SlurmdParameters=config_overrides",
            # Default delays start jobs every few seconds and hetjobs after up to 30 s.
            "SchedulerParameters=batch_sched_delay=0,bf_interval=1",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=2",
            "MessageTimeout=10",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"StateSaveLocation={d}/ctld",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "GresTypes=gpu",
        ]
        for node, port in zip(self.nodes, ports[1:], strict=True):
            gres = f" Gres={node.gres}" if node.gpus else ""
            lines.append(
                f"NodeName={node.name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={node.cpus} RealMemory={node.memory_mb}{gres} State=UNKNOWN"
            )
        all_nodes = ",".join(n.name for n in self.nodes)
        for i, partition in enumerate(self.partitions):
            default = " Default=YES" if i == 0 else ""
            lines.append(
                f"PartitionName={partition} Nodes={all_nodes}{default} MaxTime=INFINITE State=UP"
            )
        self.conf_path.write_text("\n".join(lines) + "\n")
        (self.conf_path.parent / "gres.conf").write_text("\n".join(gres_lines) + "\n")

    # ---- lifecycle ---------------------------------------------------------------------

    def running_daemons(self) -> dict[str, int]:
        """Daemons whose pid file names a live process of the right binary."""
        alive: dict[str, int] = {}
        for name, pid_file in self._pid_files().items():
            pid = self._read_pid(pid_file)
            binary = "munged" if name == "munged" else name.split("-", 1)[0]
            if pid and _process_alive(pid) and _runs_binary(pid, binary):
                alive[name] = pid
        return alive

    def start(self, timeout: float = 30.0) -> None:
        """Write the config, start munged, slurmctld and every slurmd; wait for all nodes idle."""
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(
                f"not installed: {', '.join(missing)} (run .ci/install-test-packages.sh as root)"
            )
        if self.running_daemons():
            raise SlurmClusterError(
                f"daemons already running from {self.state_dir}: {self.running_daemons()}"
            )
        self.write_config()
        deadline = time.monotonic() + timeout
        try:
            munge_dir = self.state_dir / "munge"
            self._spawn(
                "munged",
                [
                    self._bin("munged"),
                    "--foreground",
                    f"--key-file={munge_dir / 'munge.key'}",
                    f"--socket={self.munge_socket}",
                    f"--pid-file={munge_dir / 'munged.pid'}",
                    f"--log-file={self.log_dir / 'munged.log'}",
                    f"--seed-file={munge_dir / 'munged.seed'}",
                ],
            )
            self._wait_for(
                "munged socket",
                lambda: (
                    self.munge_socket.is_socket()
                    and self._quiet_ok([self._bin("munge"), "-n", "-S", str(self.munge_socket)])
                ),
                deadline,
            )
            self._spawn(
                "slurmctld", [self._bin("slurmctld"), "-D", "-c", "-f", str(self.conf_path)]
            )
            self._wait_for(
                "slurmctld to answer", lambda: self._quiet_ok(["scontrol", "ping"]), deadline
            )
            for node in self.nodes:
                self._spawn(
                    f"slurmd-{node.name}",
                    [self._bin("slurmd"), "-D", "-N", node.name, "-f", str(self.conf_path)],
                )
            self._wait_for("all nodes idle", self._all_idle, deadline)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel leftover jobs, then stop every daemon by its pid and wait until it is gone."""
        deadline = time.monotonic() + timeout
        alive = self.running_daemons()
        if "slurmctld" in alive and "munged" in alive:
            self._cancel_all_jobs(min(5.0, timeout / 2))
        self._kill_stray_steps()
        slurm = {k: v for k, v in alive.items() if k != "munged"}
        self._terminate(slurm, deadline)
        if "munged" in alive:
            self._terminate({"munged": alive["munged"]}, deadline)
        # Reap children we started that exited on their own.
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        self._procs.clear()
        left = self.running_daemons()
        if left:
            raise SlurmClusterError(f"daemons still running after stop: {left}")

    def status(self) -> ClusterStatus:
        """Which daemons are alive and, if slurmctld answers, the ``sinfo`` node lines."""
        daemons = self.running_daemons()
        expected = [*(f"slurmd-{n.name}" for n in self.nodes), "slurmctld", "munged"]
        sinfo: list[str] = []
        if "slurmctld" in daemons:
            result = self.run(["sinfo", "-h", "-N", "-o", "%N %P %T %G"], check=False)
            sinfo = result.stdout.splitlines()
        return ClusterStatus(expected=tuple(expected), daemons=daemons, sinfo=tuple(sinfo))

    def __enter__(self) -> LoopbackSlurm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- client helpers ----------------------------------------------------------------

    def run(
        self,
        args: Sequence[str],
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client against this cluster; with ``check`` a failure raises with stderr."""
        full_env = self.env
        if env:
            full_env.update(env)
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            cwd=cwd,
            env=full_env,
        )
        if check and result.returncode != 0:
            raise SlurmClusterError(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def sbatch(
        self,
        script: str,
        args: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """Submit a batch script given as text; returns the job id."""
        result = self.run(["sbatch", "--parsable", *args], input=script, cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def job_records(self, job_id: int) -> list[dict[str, str]]:
        """``scontrol show job`` records of a job (one per hetjob component); [] once purged."""
        result = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if result.returncode != 0:
            return []
        return [parse_scontrol_record(line) for line in result.stdout.splitlines() if line]

    def job_state(self, job_id: int) -> str | None:
        """State of the job's first component, e.g. ``PENDING``; None if Slurm forgot it."""
        records = self.job_records(job_id)
        return records[0].get("JobState") if records else None

    def start_requeued_now(self, job_id: int, timeout: float = 30.0) -> None:
        """Start a requeued job at once rather than after Slurm's hold (AuthInfo cred_expire
        + 1 s, 120 s by default).

        The hold covers a rule of slurmd: it refuses to launch a job whose credential was made
        no later than, in whole seconds, the last kill of that job (which revoked the earlier
        run's credentials); the job then ends FAILED, exit code 1 ("Job credential revoked").
        So the start is forced only once the job is PENDING (no longer completing: every kill
        is behind it) and the clock has moved past the second in which it was seen so.
        """
        deadline = time.monotonic() + timeout
        while self.job_state(job_id) != "PENDING":
            if time.monotonic() > deadline:
                raise SlurmClusterError(f"job {job_id} not pending after {timeout}s")
            time.sleep(0.05)
        seen = time.time()
        time.sleep(int(seen) + 1 - seen + 0.05)
        self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def wait_job(self, job_id: int, timeout: float = 30.0, poll: float = 0.1) -> JobResult:
        """Poll until every component of the job is in a final state; raise on timeout."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.job_records(job_id)
            if records and all(r.get("JobState") in TERMINAL_STATES for r in records):
                states = [r["JobState"] for r in records]
                state = next((s for s in states if s != "COMPLETED"), "COMPLETED")
                codes = [r.get("ExitCode", "0:0").split(":") for r in records]
                return JobResult(
                    job_id=job_id,
                    state=state,
                    exit_code=max(int(c[0]) for c in codes),
                    signal=max(int(c[1]) for c in codes),
                    records=tuple(records),
                )
            time.sleep(poll)
        states = [r.get("JobState") for r in records]
        raise SlurmClusterError(f"job {job_id} not finished after {timeout}s: states {states}")

    def log_tails(self, lines: int = 25) -> str:
        """Last lines of each daemon's log, for error messages.

        A daemon's captured output (NAME.out) stands in when it wrote no log yet, e.g. when
        it died reading its config; otherwise it only repeats the log.
        """
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.suffix == ".out" and _tail(path.with_suffix(".log"), 1):
                continue
            tail = _tail(path, lines)
            if tail:
                parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    # ---- internals ---------------------------------------------------------------------

    @staticmethod
    def _bin(name: str) -> str:
        path = find_binary(name)
        if path is None:
            raise SlurmClusterError(f"{name} is not installed (run .ci/install-test-packages.sh)")
        return path

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _daemon_env(self) -> dict[str, str]:
        """A small, fixed environment: nothing from the caller (e.g. LD_PRELOAD) leaks in."""
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SLURM_CONF": str(self.conf_path),
            "LANG": "C.UTF-8",
        }

    def _spawn(self, name: str, argv: list[str]) -> None:
        """Start a daemon in the foreground of its own session, its output in log/NAME.out.

        Foreground children are reaped by ``wait`` here instead of lingering as zombies; the
        new session keeps them alive after a CLI ``start`` exits and away from Ctrl-C.
        """
        with open(self.log_dir / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                cwd=self.state_dir,
                start_new_session=True,
            )

    def _wait_for(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll ``ready`` until it holds; fail at once if a daemon we started has exited."""
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmClusterError(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n"
                        f"{self.log_tails()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                sinfo = self.run(["sinfo", "-N", "-o", "%N %T %E"], check=False, timeout=10)
                raise SlurmClusterError(
                    f"timed out waiting for {what}\nsinfo: {sinfo.stdout}{sinfo.stderr}\n"
                    f"{self.log_tails()}"
                )
            time.sleep(0.1)

    def _quiet_ok(self, args: list[str]) -> bool:
        try:
            return self.run(args, check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _all_idle(self) -> bool:
        result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10)
        if result.returncode != 0:
            return False
        states = dict(line.split() for line in result.stdout.splitlines() if line.strip())
        return all(states.get(n.name) == "idle" for n in self.nodes)

    def _cancel_all_jobs(self, timeout: float) -> None:
        """Cancel queued and running jobs and give slurmd a moment to kill their processes."""
        result = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10)
        job_ids = sorted({j for j in result.stdout.split() if j.isdigit()})
        if not job_ids:
            return
        self.run(["scancel", *job_ids], check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10)
            if result.returncode != 0 or not result.stdout.strip():
                return
            time.sleep(0.1)

    def _kill_stray_steps(self) -> None:
        """SIGKILL slurmstepd processes of this cluster: they outlive slurmd once detached."""
        conf = f"SLURM_CONF={self.conf_path}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if not _runs_binary(pid, "slurmstepd"):
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if conf in environ:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _terminate(self, pids: Mapping[str, int], deadline: float) -> None:
        """SIGTERM, wait until gone (reaping our own children), SIGKILL whatever is left."""
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        kill_at = max(time.monotonic() + 0.5, deadline - 2.0)
        killed = False
        while True:
            for name in pids:
                proc = self._procs.get(name)
                if proc is not None:
                    proc.poll()
            pending = [pid for pid in pids.values() if _process_alive(pid)]
            if not pending:
                return
            now = time.monotonic()
            if now > kill_at and not killed:
                for pid in pending:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed = True
            if now > deadline + 2.0:
                return
            time.sleep(0.05)

    @staticmethod
    def _run_checked(argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmClusterError(f"{' '.join(argv)} failed: {result.stderr}")


def main(argv: Iterable[str] | None = None) -> int:
    """CLI: start, stop or show the status of a cluster in DIR."""
    parser = argparse.ArgumentParser(description="Loopback Slurm test cluster")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("dir", help="state directory (short path, e.g. under /tmp)")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    cluster = LoopbackSlurm(args.dir)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            cluster.start(timeout=args.timeout)
            print(f"started in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            print(f"export SLURM_CONF={cluster.conf_path}")
            return 0
        if args.command == "stop":
            cluster.stop(timeout=args.timeout)
            return 0
        status = cluster.status()
        print(status)
        return 0 if status.running else 1
    except SlurmClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
