"""``dlopt gate``: check a report.json against thresholds in CI; exit 1 when one is crossed.

Only click is imported with this module so ``dlopt --help`` stays fast; the
gate itself (``dlopt.gate``) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

CONFIG_FILE = "dlopt.toml"


def _report_path(path: Path) -> Path:
    """An output folder stands for its report.json."""
    return path / "report.json" if path.is_dir() else path


def _write_atomically(path: Path, text: str) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("report", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A previous report.json (e.g. from main) to compare with, instead of this report's "
                   "original model.")
@click.option("--max-accuracy-drop", default=None, metavar="POINTS",
              help="Largest accuracy drop in percentage points of the report's score.")
@click.option("--max-latency-regression", default=None, metavar="PERCENT",
              help="Largest p50 slow-down, e.g. 10% (negative: must be that much faster).")
@click.option("--max-size-mb", default=None, metavar="MB", help="Largest artefact size in MB (1e6 bytes).")
@click.option("--max-energy-regression", default=None, metavar="PERCENT",
              help="Largest increase in joules per inference, e.g. 5%.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help=f"TOML file with a [gate] table [default: ./{CONFIG_FILE} if present]; flags override it.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Write JUnit XML here.")
@click.option("--markdown", type=click.Path(path_type=Path), default=None,
              help="Write a pull-request comment (Markdown table) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the gate results as JSON.")
def gate(report, baseline, max_accuracy_drop, max_latency_regression, max_size_mb, max_energy_regression,
         config, junit, markdown, as_json):
    """Check REPORT (a report.json or a dlopt output folder) against thresholds.

    Without --baseline, the chosen candidate is compared with the report's
    original model; with it, with the baseline report's chosen candidate.  A
    figure the report lacks (latency of a target that is not this machine, energy)
    is reported as skipped, not passed silently.  Exit 0 when every gate holds,
    1 when one fails, 2 on bad input.

    \b
    Example:
      dlopt gate build/report.json --baseline main/report.json \\
          --max-accuracy-drop 0.5 --max-latency-regression 10% --junit gate.xml
    \b
    dlopt.toml:
      [gate]
      max-accuracy-drop = 0.5
      max-latency-regression = "10%"
      max-size-mb = 25
    """
    thresholds = thresholds_from(config, max_accuracy_drop=max_accuracy_drop,
                                 max_latency_regression=max_latency_regression, max_size_mb=max_size_mb,
                                 max_energy_regression=max_energy_regression)
    from dlopt.gate import load_report

    data = load_report(_report_path(report))
    base = load_report(_report_path(baseline), f"baseline {baseline}") if baseline is not None else None
    check_report(data, thresholds, base, junit=junit, markdown=markdown, as_json=as_json)


def thresholds_from(config: Path | None, **flags):
    """Thresholds of the [gate] table in ``config`` (default ./dlopt.toml), overridden by flags."""
    from dlopt.errors import ConfigError
    from dlopt.gate import Thresholds, load_thresholds

    if config is None and Path(CONFIG_FILE).is_file():
        config = Path(CONFIG_FILE)
    elif config is not None and not config.is_file():
        raise ConfigError(f"gate config {config} not found")
    thresholds = (load_thresholds(config) if config else Thresholds()).merged(**flags)
    if thresholds == Thresholds():
        raise ConfigError("no thresholds to check: pass --max-accuracy-drop, --max-latency-regression, "
                          f"--max-size-mb or --max-energy-regression, or add a [gate] table to {CONFIG_FILE}")
    return thresholds


def check_report(data: dict, thresholds, baseline: dict | None = None, *, junit: Path | None = None,
                 markdown: Path | None = None, as_json: bool = False, quiet: bool = False) -> None:
    """Run the gates, write JUnit/Markdown if asked, print the table, raise GateFailed on a failure."""
    import json

    from dlopt.gate import enforce, format_value, run_gate, to_junit, to_markdown

    results = run_gate(data, thresholds, baseline)
    if junit is not None:
        _write_atomically(junit, to_junit(results))
    if markdown is not None:
        _write_atomically(markdown, to_markdown(results, data))
    if as_json:
        click.echo(json.dumps({"passed": all(r.passed for r in results),
                               "gates": [r.to_dict() for r in results]}, indent=2))
    elif not quiet:
        from tabulate import tabulate

        rows = [[r.name, format_value(r.measured, r.unit), format_value(r.allowed, r.unit), r.status, r.detail]
                for r in results]
        click.echo(tabulate(rows, headers=["gate", "measured", "allowed", "status", "detail"],
                            maxcolwidths=[None, None, None, None, 60]))
    enforce(results)
