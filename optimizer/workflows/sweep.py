"""Sweeps: compile models x targets x option variants (a platform team's nightly job) into one table.

``sweep.toml``::

    [sweep]
    models = ["cnn.onnx", "bert.onnx"]   # relative to this file
    targets = ["cpu", "rpi5"]
    out = "nightly"                      # default: <file stem>-out beside the file
    targets-file = "dlopt.toml"          # optional: your own [targets.NAME] tables

    [options]                            # every entry: dlopt.compile options (runs, samples, ...)
    runs = 50

    [models.bert]                        # optional: bert.onnx's own options (data, shapes, metric, ...)
    shapes = {input_ids = [1, 128], attention_mask = [1, 128]}

    [variants.fp32]                      # optional: one entry per variant, options on top of [options]
    precision = "fp32"
    [variants.auto]
    precision = "auto"

An entry's options are [options], then its model's table, then its variant's, each key replacing the
one before; a key in both a model's table and a variant is refused (neither silently wins).

Each entry compiles to ``OUT/<model stem>/<target>/<variant>/`` (a normal compile output, published
whole or not at all), so a rerun skips entries whose output is complete and retries the rest.  An
entry's failure is a row of the table, never the end of the sweep.  With Ray each entry is a task
holding ``cpus_per_task`` CPUs (one by default: one task per core); its artefact keeps the threads it
would have without Ray (the target's cores, or the options' threads), never the task's share.
Without Ray, entries run one after another.

Model names (file stems), target and variant names are plain folder names, each once (case
folded); every entry's folder resolves inside OUT before anything is compiled.

Guarantees: OUT/sweep.json and OUT/sweep.md are written whole (temp file, rename), and only over
files a sweep wrote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from dlopt import __version__
from dlopt.core.artifacts import write_file
from dlopt.core.config import SECTION_OF, TOP_LEVEL, CompileConfig
from dlopt.core.errors import AccuracyBudgetExceeded, ConfigError, DloptError, TargetUnavailable, first_line
from dlopt.core.optional import require
from dlopt.core.profiles import resolve_target
from dlopt.core.ray_local import LOOPBACK_ENV, ray_on_loopback
from dlopt.core.scoped_env import environ
from dlopt.core.toml_file import read_toml
from dlopt.measure.budget import BUILTIN
from dlopt.report.data import escape_markdown
from dlopt.report.schema import load_report
from dlopt.targets import read_manifest

TABLE_JSON, TABLE_MD = "sweep.json", "sweep.md"
_PATH_OPTIONS = ("inputs", "calib", "targets_file", "tuning_db")
_NOT_OPTIONS = {"model", "target", "out", "progress", "targets_file", "calib_preprocess"}
_METRIC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")  # module:function
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # one folder name: no '/', '..', leading '.' or space
HEADERS = ["model", "target", "variant", "status", "chosen", "p50 ms", "speedup", "drop pp", "size MB",
           "threads", "seconds", "note"]


@dataclass(frozen=True)
class Entry:
    """One compile of the sweep."""

    model: Path
    target: str
    variant: str
    options: dict[str, Any]
    out: Path
    targets_file: Path | None = None

    @property
    def key(self) -> str:
        return f"{self.model.stem}/{self.target}/{self.variant}"


@dataclass(frozen=True)
class Sweep:
    source: Path
    out: Path
    entries: tuple[Entry, ...]


@dataclass(frozen=True)
class Row:
    """An entry's result: status is ok | over-budget | failed | done (complete before this run)."""

    model: str
    target: str
    variant: str
    status: str
    out: str
    chosen: str | None = None
    p50_ms: float | None = None
    speedup: float | None = None
    drop_pp: float | None = None
    size_bytes: int | None = None
    threads: int | None = None
    seconds: float | None = None
    note: str = ""

    def cells(self) -> list[Any]:
        return [self.model, self.target, self.variant, self.status, self.chosen or "-",
                _num(self.p50_ms, ".3f"), _num(self.speedup, ".2f", "x"), _num(self.drop_pp, ".2f"),
                _num(self.size_bytes / 1e6 if self.size_bytes is not None else None, ".3f"),
                self.threads or "-", _num(self.seconds, ".1f"), self.note]


@dataclass(frozen=True)
class SweepResult:
    rows: tuple[Row, ...]
    mode: str  # "sequential" | "ray (<address>)"
    wall_seconds: float


def _num(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def load_sweep(path: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Sweep:
    """Read and check ``sweep.toml``; ConfigError naming the first thing wrong.  ``out`` (``-o``) replaces
    [sweep] out."""
    path = Path(path)
    data = read_toml(path, f"sweep {path}")
    unknown = sorted(set(data) - {"sweep", "options", "models", "variants"})
    if unknown:
        raise ConfigError(f"{path}: unknown tables {unknown}; a sweep has [sweep], [options], [models.NAME] and "
                          f"[variants.NAME]")
    head, model_paths, targets = _sweep_table(path, data)
    here = path.parent
    out = Path(out) if out is not None else here / head.get("out", f"{path.stem}-out")
    targets_file = here / head["targets-file"] if "targets-file" in head else None
    tables = _OptionTables(path)
    common = tables.options(data.get("options", {}), "[options]")
    tables.check(model_paths[0], common, "[options]")  # named as the table that holds the bad value
    model_options = _model_options(path, data, model_paths, common, tables)
    variant_options = _variant_options(path, data, model_paths[0], common, model_options, tables)
    _check_names(path, "target", targets)
    _check_names(path, "variant", list(variant_options))
    for target in targets:  # an unknown target name, too, fails before the first compile
        resolve_target(target, targets_file)
    entries = tuple(Entry(m, t, name, {**common, **model_options[m.stem], **opts}, out / m.stem / t / name,
                          targets_file)
                    for m in model_paths for t in targets for name, opts in variant_options.items())
    sweep = Sweep(path, out, entries)
    check_entry_folders(sweep)
    return sweep


def _sweep_table(path: Path, data: dict) -> tuple[dict, list[Path], list[str]]:
    """[sweep] checked: the table, its models' paths (each exists, stems distinct) and its targets."""
    head = data.get("sweep")
    if not isinstance(head, dict):
        raise ConfigError(f"{path}: no [sweep] table with models and targets")
    unknown = sorted(set(head) - {"models", "targets", "out", "targets-file"})
    if unknown:
        raise ConfigError(f"{path}: [sweep] has unknown keys {unknown}; known: models, targets, out, targets-file")
    models, targets = head.get("models"), head.get("targets", ["cpu"])
    for key, value in (("models", models), ("targets", targets)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{path}: [sweep] {key} must be a non-empty list of strings")
    model_paths = [(path.parent / m) for m in models]
    for m in model_paths:
        if not m.exists():
            raise ConfigError(f"{path}: model {m} does not exist")
    _check_names(path, "model", [m.stem for m in model_paths],
                 hint="a model's name is its file's stem: rename the file")
    return head, model_paths, targets


class _OptionTables:
    """Reads a table of compile options of ``path`` (paths in it relative to the file) and checks a set of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.known = (set(SECTION_OF) | set(TOP_LEVEL)) - _NOT_OPTIONS

    def options(self, table: Any, where: str) -> dict[str, Any]:
        path, here = self.path, self.path.parent
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {where} must be a table of compile options")
        result = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in self.known:
                raise ConfigError(f"{path}: {where} has unknown option {key!r}; known: {', '.join(sorted(self.known))}")
            if name == "metric" and not (value in BUILTIN or (isinstance(value, str) and _METRIC.fullmatch(value))):
                raise ConfigError(f"{path}: {where}: metric takes {', '.join(BUILTIN)} or module:function, "
                                  f"got {value!r:.60}")
            result[name] = str(here / value) if name in _PATH_OPTIONS and isinstance(value, str) else value
        return result

    def check(self, model: Path, opts: dict[str, Any], where: str) -> None:
        """A bad value fails now, not at night: ConfigError naming the table."""
        try:
            CompileConfig.build(model, **opts)
        except TypeError as exc:
            raise ConfigError(f"{self.path}: {where}: {first_line(exc)}") from exc
        except DloptError as exc:
            raise ConfigError(f"{self.path}: {where}: {exc}") from exc


def _model_options(path: Path, data: dict, model_paths: list[Path], common: dict,
                   tables: _OptionTables) -> dict[str, dict]:
    """Each model's own options ([models.STEM]; empty where it has no table), checked over [options]."""
    by_model = _tables(path, data, "models")
    stems = {m.stem: m for m in model_paths}
    for name in by_model:
        if name not in stems:
            raise ConfigError(f"{path}: [models.{name}] names no model of this sweep (its models: "
                              f"{', '.join(stems)}; a model's table is named after its file's stem)")
    model_options = {m.stem: tables.options(by_model.get(m.stem, {}), f"[models.{m.stem}]") for m in model_paths}
    for stem, opts in model_options.items():
        if opts:
            tables.check(stems[stem], {**common, **opts}, f"[models.{stem}]")
    return model_options


def _variant_options(path: Path, data: dict, first_model: Path, common: dict, model_options: dict[str, dict],
                     tables: _OptionTables) -> dict[str, dict]:
    """Each variant's options ([variants.NAME]; one "default" without the table), none set by a model table too."""
    variants = _tables(path, data, "variants") if "variants" in data else {"default": {}}
    if not variants:
        raise ConfigError(f"{path}: [variants] must hold at least one [variants.NAME] table")
    variant_options = {name: tables.options(v, f"[variants.{name}]") for name, v in variants.items()}
    for name, opts in variant_options.items():
        tables.check(first_model, {**common, **opts}, f"[variants.{name}]")
        for stem, own in model_options.items():
            both = sorted(set(own) & set(opts))
            if both:
                raise ConfigError(f"{path}: [models.{stem}] and [variants.{name}] both set {', '.join(both)}; set "
                                  f"each in one of them (a model's table: what differs by model)")
    return variant_options


def _tables(path: Path, data: dict, key: str) -> dict[str, dict]:
    """The ``[key.NAME]`` tables by NAME (their options are checked by the caller)."""
    tables = data.get(key, {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: [{key}] must hold [{key}.NAME] tables")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{key}.{name}] must be a table of compile options")
    return tables


def _check_names(path: Path, kind: str, names: list[str], *, hint: str = "") -> None:
    """Each name is one folder of OUT/<model>/<target>/<variant>/, and no two entries share a folder."""
    seen: dict[str, str] = {}
    hint = f" ({hint})" if hint else ""
    for name in names:
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{path}: {kind} name {name!r} cannot be a folder name under the sweep's out; use "
                              f"letters, digits, '.', '_', '+' and '-' (no '/', '..' or leading '.'){hint}")
        if name.casefold() in seen:  # one folder on case-insensitive file systems too
            twice = f"{name!r} twice" if seen[name.casefold()] == name else f"{seen[name.casefold()]!r} and {name!r}"
            raise ConfigError(f"{path}: {kind} {twice}: both entries would compile into one folder; "
                              f"{hint[2:-1] if hint else 'list it once'}")
        seen[name.casefold()] = name


def check_entry_folders(sweep: Sweep) -> None:
    """ConfigError unless every entry's folder resolves inside the sweep's out (names are checked when
    read; this catches a link on the way, such as OUT/<model> pointing elsewhere, and a Sweep built by hand)."""
    root = sweep.out.resolve()
    for entry in sweep.entries:
        real = entry.out.resolve()
        if root not in real.parents:
            raise ConfigError(f"{entry.out} resolves outside the sweep's out {sweep.out} ({real}); nothing was "
                              f"compiled: remove the link on the way or choose another out")


def complete(entry: Entry) -> dict | None:
    """The report of an entry whose output is complete (a compile publishes it whole) and was built with
    the entry's options as they are now, else None (it is compiled again)."""
    manifest = read_manifest(entry.out)
    if manifest is None:
        return None
    try:
        report = load_report(entry.out / "report.json")
    except DloptError:  # missing, damaged or of another schema
        return None
    recorded = manifest.get("options") if isinstance(manifest.get("options"), dict) else {}
    if any(key in recorded and recorded[key] != value for key, value in entry.options.items()):
        return None  # sweep.toml changed an option since
    return report


def compile_entry(entry: Entry) -> Row:
    """Compile one entry; never raises (a failure is a row).  Runs in a Ray worker too."""
    import dlopt

    start = time.perf_counter()
    try:
        # the sweep logs one line per entry; the compiles' own stage lines would interleave across tasks
        report = dlopt.compile(entry.model, target=entry.target, out=entry.out, targets_file=entry.targets_file,
                               **{"progress": False, **entry.options}).to_dict()
        status, note = "ok", ""
    except AccuracyBudgetExceeded as exc:
        report, status, note = exc.report.to_dict(), "over-budget", first_line(exc)
    except Exception as exc:  # noqa: BLE001 - one entry's failure, whatever it is, must not stop the others
        return _row(entry, "failed", None, time.perf_counter() - start, f"{type(exc).__name__}: {first_line(exc)}")
    return _row(entry, status, report, time.perf_counter() - start, note)


def _row(entry: Entry, status: str, report: dict | None, seconds: float | None, note: str = "") -> Row:
    row = Row(entry.model.stem, entry.target, entry.variant, status, str(entry.out),
              seconds=round(seconds, 2) if seconds is not None else None, note=note)
    if report is None:
        return row
    chosen = next((c for c in report.get("candidates") or [] if c.get("chosen")), None)
    measurement = (chosen or {}).get("measurement") or {}
    return replace(row, chosen=report.get("chosen"), p50_ms=(measurement.get("latency") or {}).get("p50_ms"),
                   speedup=(chosen or {}).get("speedup"), drop_pp=((chosen or {}).get("score") or {}).get("drop_pp"),
                   size_bytes=measurement.get("size_bytes"), threads=(report.get("timing") or {}).get("threads"))


def run_sweep(sweep: Sweep, *, ray: bool = False, address: str | None = None, num_cpus: int | None = None,
              cpus_per_task: int = 1, on_row: Callable[[Row], None] | None = None) -> SweepResult:
    """Run every entry not complete yet (sequentially, or as Ray tasks), write the table, return it."""
    check_entry_folders(sweep)  # before reading or writing any entry's folder
    rows: dict[str, Row] = {}
    todo = []
    for entry in sweep.entries:
        report = complete(entry)
        if report is not None:
            rows[entry.key] = _row(entry, "done", report, None, "complete before this run")
            if on_row:
                on_row(rows[entry.key])
        else:
            todo.append(entry)
    _check_table_paths(sweep.out)
    start = time.perf_counter()
    if ray:  # the artefact's threads are the target's, not the task's share: entries keep their options
        results, mode = _run_ray(todo, address, num_cpus, cpus_per_task), f"ray ({address or 'local'})"
    else:
        results, mode = ((e, compile_entry(e)) for e in todo), "sequential"
    for entry, row in results:
        rows[entry.key] = row
        if on_row:
            on_row(row)
    wall = round(time.perf_counter() - start, 2)
    result = SweepResult(tuple(rows[e.key] for e in sweep.entries), mode, wall)
    write_table(sweep, result)
    return result


def _run_ray(entries: list[Entry], address: str | None, num_cpus: int | None,
             cpus_per_task: int) -> Iterator[tuple[Entry, Row]]:
    """Yield (entry, row) as Ray tasks finish; a local Ray is started (and stopped) when none is running.

    A local Ray listens on loopback only: a sweep on one machine needs nothing reachable from outside."""
    ray = require("ray", "ray", "--ray needs Ray")
    # Ray's notices (token authentication, ...) reach stderr through logging's last resort unless
    # someone handles them: dlopt's -v does; otherwise the CLI keeps to its one-line output.
    logging.getLogger("ray").addHandler(logging.NullHandler())
    started = not ray.is_initialized()
    if started:
        try:
            with environ(**({} if address else {LOOPBACK_ENV: "0"})), ray_on_loopback(not address):
                ray.init(address=address or None, num_cpus=None if address else num_cpus, include_dashboard=False,
                         log_to_driver=False, configure_logging=False,
                         **({} if address else {"_node_ip_address": "127.0.0.1"}))
        except ValueError as exc:
            raise ConfigError(f"--ray {address or ''}: {first_line(exc)}") from exc
        except Exception as exc:  # noqa: BLE001 - Ray fails to start in many ways (OSError, RuntimeError, its own)
            where = f"reach Ray at {address}" if address else "start a local Ray"
            raise TargetUnavailable(f"--ray: cannot {where} ({type(exc).__name__}: {first_line(exc)}); "
                                    f"run the sweep without --ray, or check Ray with `ray status`") from exc
    try:
        task = ray.remote(num_cpus=cpus_per_task, max_retries=0)(compile_entry)
        pending = {task.remote(e): e for e in entries}
        while pending:
            [ready], _ = ray.wait(list(pending), num_returns=1)
            entry = pending.pop(ready)
            try:
                row = ray.get(ready)
            except Exception as exc:  # noqa: BLE001 - a worker that died: that entry failed, not the sweep
                row = _row(entry, "failed", None, None, f"Ray task failed: {first_line(exc)}")
            yield entry, row
    finally:
        if started:
            ray.shutdown()


def _check_table_paths(out: Path) -> None:
    """Refuse, before any compile, to replace a sweep.json/sweep.md that a sweep did not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"sweep output {out} exists and is not a folder")
    for name in (TABLE_JSON, TABLE_MD):
        path = out / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ConfigError(f"{path} is a link or not a regular file; the sweep will not write through it")
    if (out / TABLE_JSON).is_file():
        try:
            ours = json.loads((out / TABLE_JSON).read_text()).get("dlopt_sweep") is not None
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"{out / TABLE_JSON} exists and is not a sweep table dlopt wrote; choose another out")
    if (out / TABLE_MD).is_file() and not (out / TABLE_MD).read_text(errors="replace").startswith("# dlopt sweep"):
        raise ConfigError(f"{out / TABLE_MD} exists and is not a sweep table dlopt wrote; choose another out")


def table_markdown(sweep: Sweep, result: SweepResult) -> str:
    from tabulate import tabulate

    counts = {s: sum(r.status == s for r in result.rows) for s in ("ok", "done", "over-budget", "failed")}
    lines = [f"# dlopt sweep: {escape_markdown(sweep.source.name)}", "",
             f"{len(result.rows)} entries ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}); "
             f"{result.mode}, {result.wall_seconds:.1f} s wall for the entries run now.", "",
             tabulate([[escape_markdown(str(c)) for c in r.cells()] for r in result.rows], headers=HEADERS,
                      tablefmt="github"), ""]
    return "\n".join(lines)


def write_table(sweep: Sweep, result: SweepResult) -> tuple[Path, Path]:
    """OUT/sweep.json and OUT/sweep.md, each written whole."""
    sweep.out.mkdir(parents=True, exist_ok=True)
    data = {"dlopt_sweep": 1, "dlopt_version": __version__, "sweep": str(sweep.source), "mode": result.mode,
            "wall_seconds": result.wall_seconds, "entries": [asdict(r) for r in result.rows]}
    paths = (sweep.out / TABLE_JSON, sweep.out / TABLE_MD)

    for path, text in zip(paths, (json.dumps(data, indent=2) + "\n", table_markdown(sweep, result))):
        write_file(path, text)
    return paths
