"""`hetbatch report OUTPUT`: the job's self-contained HTML report (and PNG charts)."""

from __future__ import annotations

import click

from hetbatch.cli import options


@options.command("report")
@options.output_folder
@click.option("-o", "--html", "html_path", default="report.html", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the HTML page.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False),
              help="Also write each chart as a PNG into this folder.")
@click.option("--price", multiple=True, metavar="POOL=PRICE",
              help="Price per device-hour of a pool, for cost figures (repeatable).")
def report_command(output: str, html_path: str, png_dir: str | None,
                   price: tuple[str, ...]) -> None:
    """Write an HTML report of the job writing (or that wrote) to OUTPUT: units per instance,
    throughput against the plan, idle time, errors, lengths, cost."""
    from hetbatch.report.build import parse_prices, write_report
    from hetbatch.report.load import load_run

    write_report(load_run(output, parse_prices(price)), html_path, png_dir)
    click.echo(f"wrote {html_path}" + (f" and charts in {png_dir}/" if png_dir else ""))
