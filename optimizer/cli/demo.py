"""``dlopt demo``: train a small CNN, export it, compile it for cpu and report."""

from __future__ import annotations

from pathlib import Path

import click

from dlopt.cli.options import OUTPUT
from dlopt.cli.printing import print_report


@click.command()
@OUTPUT("out", "as_json", out={"default": Path("demo-out"), "show_default": True,
                               "help": "Where to write the demo model and its artefacts."})
def demo(output):
    """Train a small CNN on scikit-learn's digits, export it, compile it for cpu and report.

    Needs the `demo` extra (torch, scikit-learn).  Takes about a minute on two cores
    (training a small CNN, exporting it, then a full cpu compile).

    \b
    Example:
      dlopt demo -o /tmp/dlopt-demo
    """
    from dlopt.workflows.demo import run_demo

    report, accuracy = run_demo(output.out, progress=output.progress)
    print_report(report, as_json=output.as_json)
    if not output.as_json:
        click.echo(f"\ntop-1 accuracy on {accuracy['test_samples']} held-out digits: "
                   f"original {accuracy['original'] * 100:.2f}%, optimised {accuracy['optimised'] * 100:.2f}%")
