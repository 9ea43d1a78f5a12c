"""MLflow tracking: one run per compile (or gate), optionally a registered model version.

A run holds params (target, precisions, the compile's options, tool versions), metrics (the
figures of ``dlopt.deploy.metrics_export.figures``: the chosen candidate's at top level, the original's
and every candidate's under their key), artefacts (report.*, manifest.json and the chosen
artefact's files under ``artifact/``) and tags (model sha256, git commit when the model or the
working directory is in a git checkout).  It uses ``MlflowClient`` alone: the fluent API would
add tags from its own context (and run git).  Without a URI the store is MLflow's own default
(``mlflow.get_tracking_uri()``: ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``, a SQLite store, or
``./mlruns`` where that already holds a file store's runs), so ``mlflow ui`` or ``MlflowClient()``
started in the same folder reads the run with no settings.  MLflow 3 keeps file stores (a path or
``file:`` URI given to ``--mlflow``) behind ``MLFLOW_ALLOW_FILE_STORE``, which is set for the
duration of the call only.

Guarantees: a run whose logging fails is ended FAILED, never left RUNNING (unless the server
stops answering: ``deploy`` abandons the call at its deadline); only regular files that lie inside
the output folder are uploaded (a link, or a name that leaves the folder, is refused before any run
is created).
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from dlopt.core.artifacts import contained_path
from dlopt.core.errors import ConfigError, TargetUnavailable, first_line
from dlopt.core.optional import require
from dlopt.core.scoped_env import environ
from dlopt.deploy.metrics_export import figures
from dlopt.targets import read_manifest

_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores
_SQL_MODULES = ("sqlalchemy", "alembic")  # what they need beyond mlflow-skinny
_NEEDS_MLFLOW = "--mlflow needs MLflow"
EXPERIMENT = "dlopt"
ARTIFACT_DIR = "artifact"
REPORT_FILES = ("report.json", "report.md", "report.html", "manifest.json")
_PARAM_MAX = 6000  # MLflow's limit on a param value


@dataclass(frozen=True)
class TrackedRun:
    run_id: str
    experiment_id: str
    tracking_uri: str
    artifact_uri: str
    model_version: str | None = None  # the registered version, with --register


def resolve_uri(uri: str | None) -> str:
    """A tracking URI: MLflow's default when none is given (an absolute ``sqlite:///.../mlflow.db`` in
    the working directory unless ``$MLFLOW_TRACKING_URI`` or an existing ``./mlruns`` says otherwise);
    a plain path as an absolute file: URI."""
    if not uri:
        uri = require("mlflow.tracking", "mlflow", _NEEDS_MLFLOW).get_tracking_uri()
    if "://" in uri or uri.startswith(("file:", "databricks")):
        return uri
    return Path(uri).absolute().as_uri()


def check_store(uri: str | None) -> str:
    """``resolve_uri(uri)``; TargetUnavailable, before any work, when that store needs libraries that are
    not installed (MLflow's SQL stores need sqlalchemy and alembic, which mlflow-skinny leaves out)."""
    import importlib.util

    resolved = resolve_uri(uri)
    if resolved.split(":", 1)[0].split("+", 1)[0] in _SQL_SCHEMES:
        missing = [m for m in _SQL_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            store = resolved if uri else f"MLflow's default store {resolved}"
            raise TargetUnavailable(f"--mlflow: {store} needs {' and '.join(missing)}: pip install 'dlopt[mlflow]', "
                                    f"or give --mlflow a server URL or a file: store")
    return resolved


@contextlib.contextmanager
def file_store_allowed(uri: str) -> Iterator[None]:
    """Let MLflow 3 open a file: store for this call only (it refuses one by default)."""
    key = "MLFLOW_ALLOW_FILE_STORE"
    with environ(**({} if not uri.startswith("file:") or key in os.environ else {key: "true"})):
        yield


_QUIET = {"urllib3.connectionpool": "ERROR", "mlflow.store.db.utils": "WARNING", "alembic": "WARNING"}


@contextlib.contextmanager
def _retries_quiet() -> Iterator[None]:
    """Keep urllib3's "Retrying (Retry(total=6...)) after connection broken" warnings (one per retry
    of MLflow's client) off the terminal: the error, or the deadline's, says what went wrong.  The
    SQLite store's "Creating initial MLflow database tables..." (and alembic's migration lines) too:
    the CLI prints the run and its store."""
    import logging

    loggers = {logging.getLogger(name): level for name, level in _QUIET.items()}
    before = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in before.items():
            logger.setLevel(level)


def _client(uri: str):
    return require("mlflow.tracking", "mlflow", _NEEDS_MLFLOW).MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_contents(report: dict, out_dir: Path | None, *, gate_results=None) -> tuple[dict, dict, dict]:
    """(params, metrics, tags) of a run for ``report`` (and a gate's results)."""
    manifest = (read_manifest(Path(out_dir)) if out_dir else None) or {}
    chosen = report.get("chosen")
    params = {"target": (report.get("target") or {}).get("name"), "precision": report.get("precision"),
              "chosen": chosen or "none", "dlopt_version": report.get("dlopt_version"),
              "timing_shape": (report.get("timing") or {}).get("shape"),
              "evaluation": (report.get("evaluation") or {}).get("source")}
    params.update({f"option.{k}": v for k, v in (manifest.get("options") or {}).items()})
    params.update({f"version.{k}": v for k, v in (manifest.get("versions") or {}).items()})
    params = {k: str(v)[:_PARAM_MAX] for k, v in params.items() if v is not None}

    metrics: dict[str, float] = {}
    for f in figures(report):
        key = "original" if f.candidate == "original" else f.candidate.replace("/", "-")
        metrics[f"{key}.{f.name}"] = f.value
        if f.chosen:
            metrics[f.name] = f.value
    tags = {"dlopt.kind": "gate" if gate_results is not None else "compile",
            "dlopt.model_sha256": (report.get("model") or {}).get("sha256"),
            "mlflow.runName": f"{Path(str((report.get('model') or {}).get('path') or 'model')).stem}-"
                              f"{params.get('target', '')}",
            "mlflow.source.git.commit": git_commit((report.get("model") or {}).get("path"))}
    if gate_results is not None:
        tags["dlopt.gate.passed"] = str(all(r.passed for r in gate_results)).lower()
        for r in gate_results:
            tags[f"dlopt.gate.{r.name}"] = r.status
            if r.measured is not None:
                metrics[f"gate.{r.name}.measured"] = float(r.measured)
            if r.allowed is not None:
                metrics[f"gate.{r.name}.allowed"] = float(r.allowed)
    return params, metrics, {k: str(v) for k, v in tags.items() if v is not None}


def git_commit(model_path: str | None) -> str | None:
    """The commit checked out where the model lives (else the working directory), read from .git."""
    starts = [Path(model_path).absolute().parent] if model_path else []
    for start in [*starts, Path.cwd()]:
        for folder in (start, *start.parents):
            git = folder / ".git"
            if git.is_file():  # a worktree or submodule: "gitdir: <path>"
                text = git.read_text(errors="replace").strip()
                git = (folder / text.removeprefix("gitdir:").strip()) if text.startswith("gitdir:") else None
            if git is not None and git.is_dir():
                return _head(git)
    return None


def _head(git: Path) -> str | None:
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head[4:].strip()
        for root in (git, Path((git / "commondir").read_text().strip()) if (git / "commondir").is_file() else git):
            root = root if root.is_absolute() else git / root
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
            packed = root / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except OSError:
        return None
    return None


def log_run(report: dict, out_dir: Path | None, *, tracking_uri: str | None = None, register: str | None = None,
            experiment: str = EXPERIMENT, gate_results=None, step: Callable[[str], None] | None = None,
            files: list[tuple[Path, str | None]] | None = None) -> TrackedRun:
    """Log ``report`` (and the output folder ``out_dir``'s files) as one MLflow run.

    ``step(phrase)`` is told what the call is doing before each request (``deploy`` names it when
    the server stops answering); ``files`` is ``upload_plan(out_dir, report)`` when already made."""
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    step = step or (lambda doing: None)
    uri = resolve_uri(tracking_uri)
    params, metrics, tags = run_contents(report, out_dir, gate_results=gate_results)
    if register and not report.get("chosen"):
        raise ConfigError(f"--register {register}: the compile chose no artefact (over the accuracy budget)")
    files = upload_plan(out_dir, report) if files is None else files
    # MLflow (3.18, with sqlalchemy) also opens its default store, ./mlflow.db, when registering a model in
    # another one: every default it resolves during the call is the store the user named.
    with file_store_allowed(uri), environ(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri), _retries_quiet():
        client = _client(uri)
        try:
            step(f"looking up experiment {experiment}")
            found = client.get_experiment_by_name(experiment)
            if not found:
                step(f"creating experiment {experiment}")
            experiment_id = found.experiment_id if found else client.create_experiment(experiment)
            step("creating the run")
            run = client.create_run(experiment_id, tags=tags)
        except MlflowException as exc:
            raise ConfigError(f"--mlflow {uri}: {first_line(exc)}") from exc
        run_id, status = run.info.run_id, "FAILED"
        try:
            stamp = _millis(report)
            step("logging params and metrics")
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
                             params=[Param(k, v) for k, v in params.items()])
            for path, where in files:
                step(f"uploading {where + '/' if where else ''}{path.name}")
                client.log_artifact(run_id, str(path), where)
            if register:
                step(f"registering {register}")
            version = _register(client, register, run, report) if register else None
            status = "FINISHED"
        except MlflowException as exc:
            raise ConfigError(f"--mlflow {uri}: run {run_id}: {first_line(exc)}") from exc
        finally:
            step(f"ending run {run_id}")
            with contextlib.suppress(MlflowException):
                client.set_terminated(run_id, status)
    return TrackedRun(run_id, experiment_id, uri, run.info.artifact_uri, version)


def upload_plan(out_dir: Path | None, report: dict) -> list[tuple[Path, str | None]]:
    """(file, artifact path) for report.*, the manifest and the chosen artefact's files.

    ConfigError for one that is a link, not a regular file or outside ``out_dir`` (a folder from
    someone else must not make dlopt upload ~/.ssh); a report file that is not there is skipped.
    Checked by ``artifacts.contained_path``, the one check of paths an output folder names."""
    if out_dir is None:
        return []
    out_dir = Path(out_dir)
    files = [(_inside(out_dir, n), None) for n in REPORT_FILES if os.path.lexists(out_dir / n)]
    manifest = read_manifest(out_dir) or {}
    if report.get("chosen"):
        files += [(_inside(out_dir, str(name)), ARTIFACT_DIR) for name in manifest.get("files") or []]
    return files


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` when it is a regular file of the folder itself, reached through no link."""
    path = contained_path(Path(folder), name, named_in="uploaded by --mlflow")  # relative, inside, no link
    try:
        regular = stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        regular = False
    if not regular or len(PurePosixPath(name).parts) != 1:  # the run's folders are flat: report.*, artifact/*
        raise ConfigError(f"--mlflow: {path} is not a regular file of {folder}; dlopt uploads only the output "
                          f"folder's own files: recompile it")
    return path


def _register(client, name: str, run, report: dict) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"dlopt artefacts of {report.get('model', {}).get('path')}")
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{ARTIFACT_DIR}", run_id=run.info.run_id,
        tags={"dlopt.candidate": str(report.get("chosen")),
              "dlopt.target": str((report.get("target") or {}).get("name"))})
    return str(version.version)


def _millis(report: dict) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(str(report.get("created"))).timestamp() * 1000)
    except ValueError:
        import time

        return int(time.time() * 1000)
