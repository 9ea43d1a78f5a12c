"""What more than one verb prints: a compile's report, as tables or as JSON."""

from __future__ import annotations

import click


def print_report(report, *, as_json: bool) -> None:
    """The report of ``dlopt compile`` and ``dlopt demo``: JSON on stdout, or its head, tables and sections."""
    from tabulate import tabulate

    from dlopt.report import sections

    if as_json:
        click.echo(report.to_json(), nl=False)
        return
    for line in sections.terminal(report, (sections.HEAD,)):
        click.echo(line)
    click.echo(tabulate(report.pass_rows(), headers=report.PASS_HEADERS))
    click.echo()
    click.echo(tabulate(report.candidate_rows(), headers=report.CANDIDATE_HEADERS))
    for line in sections.terminal(report):  # the report's sections (dlopt.report.sections): calibration, notes, ...
        click.echo(line)
    click.echo(f"\n{report.summary}; artefacts in {report.output_dir}")
