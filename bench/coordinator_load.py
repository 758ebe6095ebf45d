"""The live coordinator under thousands of workers: throughput, latency, CPU and memory.

The real coordinator (the `Coordinator` the launchers start, with a real Scheduler and a real
OutputStore on local disk) runs in its own process. Load processes open N worker connections
over loopback TCP (asyncio), and each behaves as a worker does: hello, lease, a heartbeat every
`--heartbeat-s` with its lease's progress, and after `--unit-s` (+-20%) it stages a shard file
and commits it, then leases again. Connections start spread over `--ramp-s`; figures are taken
over `--duration` seconds after that.

Printed beside the targets: instances connected, messages/s sustained, p50/p99 latency of lease,
heartbeat and commit (as the workers see them), the coordinator's CPU share (of one core) and
RSS, and leases lost (lapsed on the coordinator, revoked or stale as the workers see them).

    python bench/coordinator_load.py [--instances 10000] [--heartbeat-s 1] [--unit-s 60]
                                     [--duration 60] [--procs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import logging
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
HEADER = struct.Struct(">I")
TARGETS = {"instances": 10_000, "messages_per_s": 5_000, "p99_ms": 100.0, "rss_mib": 1024}


def raise_fd_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the coordinator process ----------------------------------------------------------------------


def serve(args: argparse.Namespace) -> None:
    """Run the real coordinator until stdin closes; then print what it saw."""
    raise_fd_limit()
    logging.getLogger("hetbatch.coordinator").setLevel(logging.ERROR)  # workers hang up at the end
    from hetbatch.coordinator.ledger import OutputStore
    from hetbatch.coordinator.server import Coordinator
    from hetbatch.scheduler.core import Scheduler, SchedulerConfig

    store = OutputStore(args.out)
    store.recover()
    config = SchedulerConfig(max_unit_rows=1000, lease_timeout_s=args.lease_timeout_s)
    coordinator = Coordinator(Scheduler(10**12, config), store, {"spec": {}}, token=TOKEN)
    coordinator.start()
    host, port = coordinator.address
    print(json.dumps({"host": host, "port": port}), flush=True)
    for line in sys.stdin:
        if line.strip() == "connected":
            print(json.dumps({"connected": len(coordinator._connections)}), flush=True)
    report = {
        "connected": len(coordinator._connections),
        "leases_lapsed": coordinator.events["lease_expired"],
        "rows_committed": coordinator.scheduler.committed.total,
        "ledger_lines": len(store.records),
    }
    coordinator.stop()
    print(json.dumps(report), flush=True)


# -- the load processes ---------------------------------------------------------------------------


def frame(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


class Tally:
    """What one load process saw inside the measuring window."""

    def __init__(self, window: tuple[float, float]) -> None:
        self.window = window
        self.latency: dict[str, list[float]] = {"lease": [], "heartbeat": [], "commit": []}
        self.messages = 0
        self.revoked = 0
        self.stale = 0
        self.errors = 0
        self.connected = 0

    def note(self, kind: str, sent_at: float, took: float) -> None:
        if self.window[0] <= sent_at < self.window[1]:
            self.messages += 1
            if kind in self.latency:
                self.latency[kind].append(took)


class SimulatedWorker(asyncio.Protocol):
    """One worker's connection, driven by the generator's timer heap: one request in flight at
    a time (as a worker's client), the next action queued behind it."""

    def __init__(self, gen: LoadGenerator, name: str) -> None:
        self.gen, self.name = gen, name
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_flight: tuple[str, float] | None = None
        self.queued: list[str] = []
        self.lease: dict[str, int] | None = None
        self.lease_began = self.lease_ends = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.gen.tally.connected += 1
        self.act("hello")

    def act(self, kind: str) -> None:
        if self.in_flight is not None:
            self.queued.append(kind)
            return
        assert self.transport is not None
        fields = self.gen.fields(self, kind)
        if fields is None:
            return
        self.in_flight = (kind, self.gen.loop.time())
        self.transport.write(frame({"op": kind, "token": TOKEN, **fields}))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + length:
                return
            reply = json.loads(bytes(self.buffer[HEADER.size : HEADER.size + length]))
            del self.buffer[: HEADER.size + length]
            assert self.in_flight is not None
            kind, sent = self.in_flight
            self.in_flight = None
            self.gen.on_reply(self, kind, sent, reply)
            if self.queued and self.in_flight is None:
                self.act(self.queued.pop(0))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class LoadGenerator:
    """Many simulated workers on one event loop, their next actions on one timer heap."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.args, self.loop = args, loop
        start = loop.time() + args.ramp_s + args.settle_s
        self.stop_at = start + args.duration + args.settle_s
        self.tally = Tally((start, start + args.duration))
        self.timers: list[tuple[float, int, SimulatedWorker, str]] = []
        self.seq = 0

    def at(self, when: float, worker: SimulatedWorker, kind: str) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, worker, kind))

    def fields(self, w: SimulatedWorker, kind: str) -> dict[str, Any] | None:
        if kind == "hello":
            return {"instance": w.name, "weight": 1.0, "pool": "p", "concurrency": 64}
        if kind == "lease":
            return {"instance": w.name}
        if kind == "heartbeat":
            progress = {}
            if w.lease is not None:
                rows = w.lease["end"] - w.lease["start"]
                span = max(w.lease_ends - w.lease_began, 1e-9)
                done = int(rows * min(1.0, (self.loop.time() - w.lease_began) / span))
                progress[str(w.lease["id"])] = [rows, done]
            return {"instance": w.name, "progress": progress}
        lease = w.lease  # commit
        if lease is None:
            return None
        w.lease = None
        staging = f"{w.name}-{lease['id']}-{lease['start']}-{lease['end']}.parquet"
        with open(os.path.join(self.args.staging, staging), "wb"):
            pass
        rows = lease["end"] - lease["start"]
        return {
            "instance": w.name, "lease": lease["id"], "start": lease["start"],
            "end": lease["end"], "staging": staging,
            "stats": {"rows": rows, "completion_tokens": rows * 100},
        }

    def on_reply(self, w: SimulatedWorker, kind: str, sent: float, reply: dict[str, Any]) -> None:
        now = self.loop.time()
        tally = self.tally
        tally.note(kind, sent, now - sent)
        if "error" in reply:
            tally.errors += 1
        if kind == "hello":
            self.at(now + random.uniform(0, self.args.heartbeat_s), w, "heartbeat")
            self.at(now, w, "lease")
        elif kind == "heartbeat":
            if w.lease is not None and w.lease["id"] in reply.get("revoked", []):
                tally.revoked += 1
                w.lease = None
                self.at(now, w, "lease")
            self.at(sent + self.args.heartbeat_s, w, "heartbeat")
        elif kind == "lease":
            if "lease" in reply:
                w.lease = reply["lease"]
                w.lease_began = now
                w.lease_ends = now + self.args.unit_s * random.uniform(0.8, 1.2)
                self.at(w.lease_ends, w, "commit")
            else:
                self.at(now + float(reply.get("wait", 0.25)), w, "lease")
        elif kind == "commit":
            tally.stale += reply.get("status") != "accepted"
            self.at(now, w, "lease")

    async def run(self, names: list[str]) -> list[str]:
        failures: list[str] = []

        async def connect(name: str) -> None:
            await asyncio.sleep(random.uniform(0, self.args.ramp_s))
            try:
                await self.loop.create_connection(
                    lambda: SimulatedWorker(self, name), self.args.host, self.args.port
                )
            except OSError as exc:
                failures.append(repr(exc))

        connecting = asyncio.gather(*(connect(n) for n in names))
        while self.loop.time() < self.stop_at:
            now = self.loop.time()
            while self.timers and self.timers[0][0] <= now:
                _, _, worker, kind = heapq.heappop(self.timers)
                if worker.transport is not None:
                    worker.act(kind)
            due = self.timers[0][0] if self.timers else now + 0.01
            await asyncio.sleep(min(max(due - now, 0.0), 0.01))
        await connecting
        return failures


async def load_main(args: argparse.Namespace) -> dict[str, Any]:
    gen = LoadGenerator(args, asyncio.get_running_loop())
    failures = await gen.run([f"w{i}" for i in range(args.first, args.first + args.count)])
    t = gen.tally
    return {
        "messages": t.messages, "latency": t.latency, "revoked": t.revoked, "stale": t.stale,
        "errors": t.errors, "connected": t.connected, "failures": failures[:3],
        "failed": len(failures),
    }


def load(args: argparse.Namespace) -> None:
    raise_fd_limit()
    print(json.dumps(asyncio.run(load_main(args))), flush=True)


# -- the driver -----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def run(args: argparse.Namespace) -> None:
    raise_fd_limit()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    me = [sys.executable, __file__]
    with tempfile.TemporaryDirectory(prefix="coordload-") as tmp:
        out = Path(tmp) / "out"
        coord = subprocess.Popen(
            [*me, "serve", "--out", str(out), "--lease-timeout-s", str(args.lease_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert coord.stdin and coord.stdout
        address = json.loads(coord.stdout.readline())
        staging = out / "_hetbatch" / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        per = -(-args.instances // args.procs)
        loads = [
            subprocess.Popen(
                [*me, "load", "--host", address["host"], "--port", str(address["port"]),
                 "--first", str(p * per), "--count", str(min(per, args.instances - p * per)),
                 "--staging", str(staging), *forwarded(args)],
                stdout=subprocess.PIPE, text=True, env=env,
            )
            for p in range(args.procs)
        ]
        time.sleep(args.ramp_s + args.settle_s)
        cpu0, t0 = proc_cpu_s(coord.pid), time.monotonic()
        time.sleep(args.duration)
        cpu1, t1 = proc_cpu_s(coord.pid), time.monotonic()
        coord.stdin.write("connected\n")
        coord.stdin.flush()
        connected_at_end = json.loads(coord.stdout.readline())["connected"]
        rss, peak = proc_mem_mib(coord.pid, "VmRSS"), proc_mem_mib(coord.pid, "VmHWM")
        reports = [json.loads(p.communicate()[0]) for p in loads]
        coord.stdin.close()
        final = json.loads(coord.stdout.read().strip().splitlines()[-1])
        coord.wait()
    summarise(args, reports, final, connected_at_end, (cpu1 - cpu0) / (t1 - t0), rss, peak)


def forwarded(args: argparse.Namespace) -> list[str]:
    return [
        "--heartbeat-s", str(args.heartbeat_s), "--unit-s", str(args.unit_s),
        "--duration", str(args.duration), "--ramp-s", str(args.ramp_s),
        "--settle-s", str(args.settle_s),
    ]


def summarise(
    args: argparse.Namespace,
    reports: list[dict[str, Any]],
    final: dict[str, Any],
    connected: int,
    cpu_share: float,
    rss: float,
    peak: float,
) -> None:
    kinds = ("lease", "heartbeat", "commit")
    lat = {k: [x for r in reports for x in r["latency"][k]] for k in kinds}
    messages = sum(r["messages"] for r in reports) / args.duration
    worst_p99 = max((pct(v, 0.99) for v in lat.values() if v), default=float("inf"))
    lost = final["leases_lapsed"] + sum(r["revoked"] + r["stale"] for r in reports)
    print(f"coordinator load: {args.instances:,} instances over {args.procs} load processes, "
          f"heartbeat every {args.heartbeat_s:g} s, unit {args.unit_s:g} s, "
          f"lease timeout {args.lease_timeout_s:g} s, measured over {args.duration:g} s "
          f"(loads: {os.getloadavg()[0]:.2f})")
    print(f"  instances connected at the end   {connected:>10,}   target {TARGETS['instances']:,}")
    print(f"  messages/s sustained             {messages:>10,.0f}   target >= "
          f"{TARGETS['messages_per_s']:,}")
    for kind, values in lat.items():
        p50, p99 = pct(values, 0.5), pct(values, 0.99)
        print(f"  {kind:<10} p50 / p99 ms          {p50:>6.1f} / {p99:<7.1f}  target p99 < "
              f"{TARGETS['p99_ms']:g}   ({len(values):,} calls)")
    per_message_us = cpu_share / messages * 1e6 if messages else float("nan")
    print(f"  coordinator CPU (share of 1 core) {cpu_share:>9.2f}   = {per_message_us:.0f} us per "
          f"message: {1e6 / per_message_us:,.0f} messages/s would fill one core")
    print(f"  coordinator RSS / peak MiB       {rss:>6.0f} / {peak:<6.0f}   target < "
          f"{TARGETS['rss_mib']}")
    print(f"  leases lost to slowness          {lost:>10}   target 0 "
          f"(lapsed {final['leases_lapsed']}, revoked "
          f"{sum(r['revoked'] for r in reports)}, stale {sum(r['stale'] for r in reports)})")
    print(f"  error replies {sum(r['errors'] for r in reports)}, failed connections "
          f"{sum(r['failed'] for r in reports)} {[f for r in reports for f in r['failures']][:2]}")
    print(f"  rows committed {final['rows_committed']:,} in {final['ledger_lines']:,} units")
    met = (connected >= min(args.instances, TARGETS["instances"])
           and messages >= TARGETS["messages_per_s"] and worst_p99 < TARGETS["p99_ms"]
           and lost == 0 and peak < TARGETS["rss_mib"])
    print(f"  all targets met: {'yes' if met else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", default="run", choices=["run", "serve", "load"])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2, help="load-generating processes")
    parser.add_argument("--heartbeat-s", type=float, default=1.0)
    parser.add_argument("--unit-s", type=float, default=60.0, help="seconds of work per unit")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--ramp-s", type=float, default=20.0)
    parser.add_argument("--settle-s", type=float, default=5.0)
    parser.add_argument("--lease-timeout-s", type=float, default=10.0)
    parser.add_argument("--out")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--staging")
    args = parser.parse_args()
    {"run": run, "serve": serve, "load": load}[args.role](args)


if __name__ == "__main__":
    main()
