"""Write a report: the HTML page and, on request, the charts as PNG files."""

from __future__ import annotations

from pathlib import Path

from hetbatch.errors import UserError
from hetbatch.report.model import JobRun


def write_report(run: JobRun, html_path: str, png_dir: str | None = None) -> None:
    from hetbatch.report.charts import render
    from hetbatch.report.page import render_page

    page = render_page(run, render(run, png_dir))
    target = Path(html_path)
    if target.is_dir():
        raise UserError(f"{html_path}: is a folder; give the report's file name")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)


def parse_prices(items: tuple[str, ...]) -> dict[str, float]:
    """`POOL=PRICE` pairs (price per device-hour) into a dict; a bad one is a user error."""
    prices = {}
    for item in items:
        pool, sep, value = item.partition("=")
        try:
            prices[pool] = float(value)
        except ValueError:
            sep = ""
        if not sep or not pool or prices.get(pool, -1) < 0:
            raise UserError(f"--price {item!r}: expected POOL=PRICE_PER_DEVICE_HOUR, e.g. a100=1.8")
    return prices
