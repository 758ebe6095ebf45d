"""`hetbatch status OUTPUT`: how far the job writing to OUTPUT has come."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from hetbatch.cli import options


@options.command("status")
@options.output_folder
@options.as_json
@click.option("--watch", is_flag=True, help="A live view, refreshed until the job ends or Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes of --watch.")
def status_command(output: str, as_json: bool, watch: bool, interval: float) -> None:
    """Progress of the job writing to OUTPUT: ledger, live coordinator, Slurm jobs."""
    from hetbatch.status import job_status

    if watch:
        from hetbatch.watch import watch_status

        sys.exit(watch_status(output, interval))

    info = job_status(output)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in _status_lines(info):
        click.echo(line)


def _status_lines(info: dict[str, Any]) -> list[str]:
    live = info.get("live")
    eta = ""
    if live and live["eta_s"] is not None:
        eta = f", {live['rows_per_s']:,.0f} rows/s, ETA {_duration(live['eta_s'])}"
    lines = [
        f"{info['state']}: {info['rows_done']:,} of {info['rows_total']:,} rows "
        f"({info['percent']:.1f}%) in {info['shards']} shards{eta}"
    ]
    if live:
        lines.append(f"coordinator {live['coordinator']}, live:")
        for name, p in sorted(live["pools"].items()):
            lines.append(
                f"  pool {name:<11} {p['instances']:>3} instances "
                f"{p['output_tokens_per_s']:>11,.0f} out tok/s"
            )
        for name, m in live["instances"].items():
            lines.append(
                f"  {name:<16} {m['rows']:>9,} rows {m['output_tokens_per_s']:>11,.0f} out tok/s"
            )
    else:
        for name, m in sorted(info["instances"].items()):
            lines.append(
                f"  {name:<16} {m['rows']:>9,} rows {m['completion_tokens']:>11,} tokens"
            )
    for job in info.get("slurm", []):
        reason = f" ({job['reason']})" if job["reason"] and job["state"] == "PENDING" else ""
        lines.append(f"  slurm {job['id']:<10} {job['role']:<14} {job['state']}{reason}")
    return lines


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
