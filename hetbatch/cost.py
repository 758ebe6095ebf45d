"""What a run cost, from prices per device-hour: tokens per dollar, dollars per million output
tokens, per pool and overall.

A pool is paid for all its devices (nodes x devices_per_node) for the run's whole wall time,
start-up and idle tails included: that is what a reservation or a rented node costs, and it is
why a slow pool that finishes early still counts for the whole run.
"""

from __future__ import annotations

from typing import Any


def cost_summary(
    pools: list[dict[str, Any]], instances: dict[str, dict[str, Any]], wall_s: float
) -> dict[str, Any] | None:
    """Cost figures, or None when the job gives no prices. `pools` are the job's pool specs
    (as dicts), `instances` the per-instance metrics (pool, prompt and completion tokens)."""
    priced = [p for p in pools if p.get("price_per_device_hour") is not None]
    if not priced:
        return None
    per_pool, total_dollars = {}, 0.0
    for pool in priced:
        mine = [m for m in instances.values() if m.get("pool") == pool["name"]]
        devices = int(pool.get("nodes", 1)) * int(pool["devices_per_node"])
        dollars = float(pool["price_per_device_hour"]) * devices * wall_s / 3600
        total_dollars += dollars
        figures = _figures(
            dollars,
            sum(m.get("prompt_tokens", 0) for m in mine),
            sum(m.get("completion_tokens", 0) for m in mine),
        )
        per_pool[pool["name"]] = {
            "price_per_device_hour": pool["price_per_device_hour"],
            "devices": devices,
            **figures,
        }
    overall = _figures(
        total_dollars,
        sum(p["prompt_tokens"] for p in per_pool.values()),
        sum(p["output_tokens"] for p in per_pool.values()),
    )
    return {"wall_s": round(wall_s, 3), "pools": per_pool, "overall": overall}


def _figures(dollars: float, prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    tokens = prompt_tokens + output_tokens
    return {
        "dollars": round(dollars, 6),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "tokens_per_dollar": round(tokens / dollars, 1) if dollars > 0 else None,
        "dollars_per_million_output_tokens": (
            round(dollars * 1e6 / output_tokens, 4) if output_tokens > 0 else None
        ),
    }


def cost_lines(cost: dict[str, Any]) -> list[str]:
    """The cost table of the end-of-run summary."""
    lines = [f"  {'cost':<16} {'dollars':>10} {'tokens/$':>12} {'$/M out tok':>12}"]
    rows = [*cost["pools"].items(), ("overall", cost["overall"])]
    for name, c in rows:
        lines.append(
            f"  {name:<16} {c['dollars']:>10,.4f} {_num(c['tokens_per_dollar'], ',.0f'):>12} "
            f"{_num(c['dollars_per_million_output_tokens'], ',.4f'):>12}"
        )
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
