"""``dlopt tune``: only click and light dlopt modules are imported with this module so ``dlopt --help`` stays fast."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import click

from dlopt.cli.options import OUTPUT, TARGET, TIMING, TVM, order


class TuneProgress:
    """One line for the whole run: trials done, the model's estimated latency (every kernel's best so
    far, which only falls) against the first estimate, time left; a log line every ``interval_s`` when
    stderr is not a terminal (CI)."""

    def __init__(self, enabled: bool, budget_s: float | None, interval_s: float = 10.0) -> None:
        self.enabled, self.budget_s, self.interval_s = enabled, budget_s, interval_s
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._logged = 0.0
        self.best = self.first = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        found = re.search(r"model ~([\d.]+) ms \(first ~([\d.]+) ms\)", stage)
        if found:
            self.best, self.first = float(found.group(1)), float(found.group(2))
        now = time.monotonic()
        elapsed = now - self.started
        left = []
        if total and done:
            left.append(elapsed / done * (total - done))
        if self.budget_s:
            left.append(max(0.0, self.budget_s - elapsed))
        parts = [stage.split(",")[0], f"{done}/{total} trials" if total else ""]
        if self.best is not None:
            change = (f", {self.best / self.first - 1:+.0%} since every kernel was first timed"
                      if self.first and self.best != self.first else "")
            parts.append(f"model ~{self.best:.3g} ms estimated{change}")
        elif "kernels timed" in stage:
            parts.append(stage.split(", ", 1)[1])
        if left and done:
            parts.append(f"~{_clock(min(left))} left")
        line = "dlopt: " + ", ".join(p for p in parts if p) + f" [{_clock(elapsed)}]"
        if self.tty:
            click.echo("\r\033[K" + line, err=True, nl=done >= total > 0)
        elif now - self._logged >= self.interval_s or (total and done >= total):
            self._logged = now
            click.echo(line, err=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@click.command()
@order("target", "targets_file", "trials", "time_budget", "db", "rpc_tracker", "rpc_key", "threads", "batch", "shapes",
       "as_json", "quiet")
@click.argument("model", type=click.Path(path_type=Path))
@TARGET(target={"help": "A target name (see `dlopt targets`)."},
        targets_file={"type": click.Path(path_type=Path),
                      "help": "TOML file with [targets.NAME] tables [default: ./dlopt.toml if present]."})
@click.option("--trials", type=click.IntRange(min=1), default=64, show_default=True,
              help="Trials the database should hold for this model and target in all (a rerun adds only the rest).")
@click.option("--time-budget", default=None, metavar="DURATION",
              help="Stop starting new rounds after this long (90s, 30m, 1h30m); what was measured is kept.")
@click.option("--db", "db", type=click.Path(path_type=Path), default=None,
              help="Root of the tuning databases [default: $DLOPT_TUNING_DB or ~/.cache/dlopt/tuning].")
@TVM("rpc_tracker", "rpc_key", rpc_key={"help": "The key the device's RPC servers registered with."},
     rpc_tracker={"help": "Measure on a device behind this TVM RPC tracker (builds stay here)."})
@TIMING("threads", "batch", "shapes",
        threads={"help": "Threads the tuned library will run with (part of the target) [default: $DLOPT_THREADS, else all cores; "
                         "a board: its cores]."},
        batch={"help": "Batch for a symbolic first dimension [1]; use the same as `dlopt compile`."},
        shapes={"help": "Shape of an input; as in `dlopt compile`."})
@OUTPUT("as_json", "quiet", as_json={"help": "Print the result as JSON on stdout."})
def tune(model, target, trials, time_budget, db, tvm, timing, output):
    """Tune MODEL's TVM kernels for a target with MetaSchedule, into a tuning database.

    The database is kept per model and per target (CPU model, features, cores), so
    records for different hardware never mix, and `dlopt compile` applies the matching
    one by itself (the report says which and how many tasks were tuned).  A run that
    is interrupted, even killed, keeps every trial it measured; the next run with the
    same --trials continues from there, and one that has them all runs none.  With
    --rpc-tracker the kernels are built here and measured on the device.

    \b
    Examples:
      dlopt tune resnet18.onnx --target cpu --trials 300 --time-budget 30m
      dlopt tune resnet18.onnx --target rpi5 --rpc-tracker farm:9190 --rpc-key rpi5
    """
    from dlopt.core.config import CompileConfig
    from dlopt.workflows.tune import parse_duration, run

    budget = parse_duration(time_budget) if time_budget is not None else None
    config = CompileConfig.build(model, **target.config_kwargs(), **timing.config_kwargs(),
                                 **{**tvm.config_kwargs(), "tuning_db": str(db) if db else None})
    result = run(config, trials=trials, time_budget_s=budget,
                 progress=TuneProgress(not (output.quiet or output.as_json), budget))
    if output.as_json:
        click.echo(json.dumps({"tasks": result.tasks, "tuned_tasks": result.tuned_tasks,
                               "trials_run": result.trials_run, "trials_in_db": result.trials_in_db,
                               "seconds": round(result.seconds, 2), "estimate_ms": result.estimate_ms,
                               "best_ms": result.best_ms, "database": str(result.db_path),
                               "stopped": result.stopped}, indent=2))
        return
    click.echo(result.summary())
