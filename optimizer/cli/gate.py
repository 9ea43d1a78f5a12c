"""``dlopt gate``: check a report.json against thresholds in CI; exit 1 when one is crossed.

Only click and light dlopt modules are imported with this module so ``dlopt --help`` stays fast; the
gate itself (``dlopt.report.gate``) loads when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TIMING, order
from dlopt.deploy.options import publish_options

CONFIG_FILE = "dlopt.toml"
# What `--baseline` checks when no threshold is given anywhere (the README's CI workflow passes none).
BASELINE_DEFAULTS = {"max_accuracy_drop": "0.5", "max_latency_regression": "10%"}


def _report_path(path: Path) -> Path:
    """An output folder stands for its report.json."""
    return path / "report.json" if path.is_dir() else path


def _check_output(option: str, path: Path, reads: list[Path]) -> None:
    """Refuse, before anything is written, an output path that is not a file dlopt may write.

    Only stat() is used: opening a FIFO given as the output would block.
    """
    import os
    import stat

    from dlopt.core.errors import ConfigError

    try:
        st = os.stat(path)  # follows a symlink to what it points at
    except FileNotFoundError:
        if path.is_symlink():
            raise ConfigError(f"{option} {path} is a symbolic link to nothing; give a file path") from None
        parent = next(p for p in path.absolute().parents if p.exists())
        if not parent.is_dir():
            raise ConfigError(f"{option} {path}: {parent} is not a folder") from None
        return
    except OSError as exc:
        raise ConfigError(f"{option} {path} cannot be written: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        example = path / ("gate.xml" if option == "--junit" else "gate.md")
        raise ConfigError(f"{option} {path} is a folder; give a file path such as {example}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{option} {path} is not a regular file (a FIFO, socket or device); give a file path")
    for other in reads:
        if other.exists() and os.path.samefile(path, other):
            raise ConfigError(f"{option} {path} is the report {other}, which the gate reads; write elsewhere")


def _write_output(option: str, path: Path, text: str) -> None:
    """Write ``text`` to ``path``: through an existing regular file (or the file a symlink points at),
    keeping its inode, owner and mode; or into a new file, mode 0644 less the umask."""
    import os
    import stat

    from dlopt.core.errors import ConfigError

    created = False
    try:
        try:
            before = os.stat(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            created = True
        else:
            # O_NONBLOCK: should a FIFO have been swapped in since the check, fail rather than wait for a reader
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
                os.close(fd)
                raise ConfigError(f"{option} {path} was replaced while the gate ran; nothing was written")
        with os.fdopen(fd, "wb") as fh:
            fh.truncate(0)
            fh.write(text.encode("utf-8"))
    except BaseException as exc:
        if created:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ConfigError(f"{option} {path} cannot be written: {exc.strerror or exc}") from None
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@order("baseline", "runs", "max_accuracy_drop", "max_latency_regression", "max_size_mb", "max_energy_regression",
       "config", "junit", "markdown", "allow_missing", "allow_different_eval", "as_json")
@click.argument("report", type=click.Path(path_type=Path))
@click.option("--baseline", type=click.Path(path_type=Path), default=None,
              help="A previous output folder or its report.json (e.g. from main) to compare with, instead of "
                   "this report's original model.  With both folders at hand, latency is re-timed here.")
@TIMING("runs", runs={"default": 50, "help": "Timed runs of each artefact when --baseline's and this report's "
                      "artefacts are re-timed interleaved (fewer than 20 can never show a significant difference)."})
@click.option("--max-accuracy-drop", default=None, metavar="POINTS",
              help="Largest accuracy drop in percentage points of the report's score.")
@click.option("--max-latency-regression", default=None, metavar="PERCENT",
              help="Largest p50 slow-down, e.g. 10%; it fails only when the 95% intervals of the medians "
                   "separate too (negative: must be significantly that much faster).")
@click.option("--max-size-mb", default=None, metavar="MB", help="Largest artefact size in MB (1e6 bytes).")
@click.option("--max-energy-regression", default=None, metavar="PERCENT",
              help="Largest increase in joules per inference, e.g. 5%.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help=f"TOML file with a [gate] table [default: ./{CONFIG_FILE} if present]; flags override it.")
@click.option("--junit", type=click.Path(path_type=Path), default=None, help="Write JUnit XML here.")
@click.option("--markdown", type=click.Path(path_type=Path), default=None,
              help="Write a pull-request comment (Markdown table) here.")
@click.option("--allow-missing", is_flag=True,
              help="Pass when every gate was skipped for want of figures (default: exit 1, nothing was checked).")
@click.option("--allow-different-eval", is_flag=True,
              help="Compare with a --baseline evaluated on other data or with another accuracy metric "
                   "(default: exit 2, the figures are not comparable).")
@OUTPUT("as_json", as_json={"help": "Print the gate results as JSON."})
@publish_options(triton=False)
def gate(report, baseline, timing, max_accuracy_drop, max_latency_regression, max_size_mb, max_energy_regression,
         config, junit, markdown, allow_missing, allow_different_eval, output, publishing):
    """Check REPORT (a report.json or a dlopt output folder) against thresholds.

    Without --baseline, the chosen candidate is compared with the report's
    original model; with it, with the baseline report's chosen candidate.  A
    latency regression fails only when the limit is crossed and the 95%
    intervals of the two medians separate.  When both output folders are at
    hand (--baseline OUT_DIR, or a report.json still in its folder), the two
    artefacts are re-timed interleaved on this machine (--runs each); from a
    report alone the reported intervals are compared, and the result says the
    comparison crosses runs.  With --baseline and no threshold given (flags or
    dlopt.toml), --max-accuracy-drop 0.5 and --max-latency-regression 10% are
    checked.  Evaluation data at another path counts as the same when its
    content is the same.  A
    figure the report lacks (latency of a target that is not this machine, energy)
    is reported as skipped, not passed silently; when every gate is skipped the
    gate fails (nothing was checked) unless --allow-missing.  A baseline of
    another model (the usual case: a new model against main's) gets a warning; a
    baseline of another target, evaluated on other data (evaluation source or
    feed count) or with another accuracy metric is refused, unless
    --allow-different-eval for the latter two.  Exit 0 when every gate holds,
    1 when one fails, 2 on bad input.  --junit and --markdown write into a new
    file or through an existing one (a symlink's target); a folder, FIFO or
    device is refused.  --mlflow, --metrics-file and --pushgateway record the
    report's figures with the gate's results (also when a gate fails; --register
    only when it passes).

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
    thresholds = thresholds_from(config, fallback=BASELINE_DEFAULTS if baseline is not None else None,
                                 max_accuracy_drop=max_accuracy_drop, max_latency_regression=max_latency_regression,
                                 max_size_mb=max_size_mb, max_energy_regression=max_energy_regression)
    from dlopt.report.gate import load_report
    from dlopt.report.gate_timing import output_folder

    data = load_report(_report_path(report))
    base = load_report(_report_path(baseline), f"baseline {baseline}") if baseline is not None else None
    out_dir = output_folder(report)  # its manifest and artefact, when there
    folders = (out_dir, output_folder(baseline) if baseline is not None else None)

    def record(results) -> None:
        from dlopt.deploy.options import deploy

        for line in deploy(data, out_dir, publishing, gate_results=results):
            click.echo(line, err=output.as_json)

    check_report(data, thresholds, base, junit=junit, markdown=markdown, as_json=output.as_json,
                 allow_missing=allow_missing, allow_different_eval=allow_different_eval,
                 reads=[_report_path(p) for p in (report, baseline) if p is not None],
                 on_results=record if publishing else None, folders=folders, runs=timing.runs)


def thresholds_from(config: Path | None, fallback: dict | None = None, **flags):
    """Thresholds of the [gate] table in ``config`` (default ./dlopt.toml), overridden by flags.

    A flag the user did not give (its click default: `dlopt compile --max-accuracy-drop` defaults to 1)
    only fills a threshold the table leaves unset, so `compile --gate` honours [gate] as `gate` does.
    ``fallback`` thresholds are used, and said on stderr, when neither flags nor the table set any threshold.
    """
    from dlopt.core.errors import ConfigError
    from dlopt.report.gate import Thresholds, load_thresholds

    if config is None and Path(CONFIG_FILE).is_file():
        config = Path(CONFIG_FILE)
    elif config is not None and not config.is_file():
        raise ConfigError(f"gate config {config} not found")
    ctx = click.get_current_context(silent=True)
    defaults = {name: flags.pop(name) for name in list(flags)
                if ctx is not None and ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT}
    thresholds = Thresholds().merged(**defaults)
    if config:
        thresholds = thresholds.merged(**vars(load_thresholds(config)))
    thresholds = thresholds.merged(**flags)
    if thresholds == Thresholds() and fallback:
        thresholds = Thresholds(**fallback)
        given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in fallback.items())
        click.echo(f"dlopt: no thresholds given (flags or a [gate] table in {CONFIG_FILE}); checking {given}",
                   err=True)
    if thresholds == Thresholds():
        raise ConfigError("no thresholds to check: pass --max-accuracy-drop, --max-latency-regression, "
                          f"--max-size-mb or --max-energy-regression, or add a [gate] table to {CONFIG_FILE}")
    return thresholds


def check_report(data: dict, thresholds, baseline: dict | None = None, *, junit: Path | None = None,
                 markdown: Path | None = None, as_json: bool = False, quiet: bool = False,
                 allow_missing: bool = False, allow_different_eval: bool = False, reads: tuple | list = (),
                 on_results=None, folders: tuple = (None, None), runs: int | None = None) -> None:
    """Run the gates, write JUnit/Markdown if asked, print the table, raise GateFailed on a failure.

    ``on_results(results)`` is called before a failure is raised (to record the results elsewhere)."""
    import json

    from dlopt.core.errors import ConfigError
    from dlopt.report.gate import check, enforce, format_value, printable, to_junit, to_markdown

    outputs = [(o, p) for o, p in (("--junit", junit), ("--markdown", markdown)) if p is not None]
    for option, path in outputs:
        _check_output(option, path, list(reads))
    if len(outputs) == 2 and (junit.absolute() == markdown.absolute()
                              or junit.exists() and markdown.exists() and junit.samefile(markdown)):
        raise ConfigError(f"--junit and --markdown are the same file ({junit}); give two paths")
    timing = {"runs": runs} if runs is not None else {}
    results = check(data, thresholds, baseline, allow_missing=allow_missing,
                    allow_different_eval=allow_different_eval, folders=folders, **timing)
    for r in results:
        if r.warning:
            click.echo(f"dlopt: warning: {r.warning}", err=True)
    if junit is not None:
        _write_output("--junit", junit, to_junit(results))
    if markdown is not None:
        _write_output("--markdown", markdown, to_markdown(results, data))
    if as_json:
        click.echo(json.dumps({"passed": all(r.passed for r in results),
                               "latency": next((r.comparison for r in results if r.comparison), None),
                               "gates": [r.to_dict() for r in results]}, indent=2))
    elif not quiet:
        from tabulate import tabulate

        rows = [[r.name, format_value(r.measured, r.unit), format_value(r.allowed, r.unit), r.status,
                 printable(r.detail)] for r in results]
        click.echo(tabulate(rows, headers=["gate", "measured", "allowed", "status", "detail"],
                            maxcolwidths=[None, None, None, None, 60]))
        for r in results:  # the latency comparison in one unwrapped line: how it was timed matters
            if r.comparison is not None:
                click.echo(f"{r.name}: {r.status}: {printable(r.detail)}")
    if on_results is not None:
        on_results(results)
    enforce(results)
