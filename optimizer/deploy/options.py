"""Where a finished compile goes next: a Triton repository, a KServe manifest, MLflow, Prometheus.

``@publish_options`` adds ``--triton/--name/--version/--max-batch-size/--kserve/--mlflow/
--register/--metrics-file/--pushgateway`` to a click command and hands it one checked
``PublishOptions`` as ``publishing`` (bad combinations fail before any work, exit 2);
``deploy(report, out_dir, publishing)`` does what they ask and returns one line per thing done.
Only click is imported here; each destination's library loads when it is used.

Guarantees: the network steps (Pushgateway, MLflow) together take at most ``publish_timeout``
seconds (``--publish-timeout``); each runs in a daemon thread that is abandoned at the deadline
(MLflow's client retries with backoff inside one call, and a server that drip-feeds its answer
resets every per-read timeout), and the error names the surface and the step it was doing.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from dlopt.core.optional import require

MLFLOW_DEFAULT = ""  # --mlflow alone: MLflow's own default store (./mlflow.db, SQLite), see tracking.resolve_uri
KSERVE_DEFAULT = "-"  # --kserve without a file: REPO/<name>-inferenceservice.yaml
PUBLISH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class PublishOptions:
    triton: Path | None = None
    name: str | None = None
    version: int = 1
    max_batch_size: int | None = None
    kserve: str | None = None
    mlflow: str | None = None
    register: str | None = None
    experiment: str = "dlopt"
    metrics_file: Path | None = None
    pushgateway: str | None = None
    publish_timeout: float = PUBLISH_TIMEOUT_S  # the network steps together, in seconds

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.triton, self.mlflow, self.metrics_file, self.pushgateway))

    def check(self, *, triton_allowed: bool = True) -> "PublishOptions":
        """This, checked: ConfigError for options that make no sense together or cannot be met."""
        from dlopt.core.errors import ConfigError

        if self.triton is None:
            named = [o for o, v in (("--name", self.name), ("--max-batch-size", self.max_batch_size),
                                    ("--kserve", self.kserve)) if v is not None]
            if named:
                listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
                verb, they = ("needs", "it describes") if len(named) == 1 else ("need", "they describe")
                raise ConfigError(f"{listed} {verb} --triton REPO ({they} the Triton model)")
        elif not triton_allowed:
            raise ConfigError("--triton packages a compile's artefact; a gate has none")
        if self.register is not None and self.mlflow is None:
            raise ConfigError("--register NAME needs --mlflow [TRACKING_URI] (the version is registered there)")
        if not (isinstance(self.publish_timeout, (int, float)) and 0 < self.publish_timeout < float("inf")):
            raise ConfigError(f"--publish-timeout must be a positive number of seconds, got {self.publish_timeout}")
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise ConfigError(f"--max-batch-size must be 0 or more, got {self.max_batch_size}")
        if self.name is not None:
            from dlopt.deploy.triton import check_name

            check_name(self.name)
        needs = [(self.triton, "tritonclient", "triton"), (self.mlflow, "mlflow", "mlflow"),
                 (self.metrics_file or self.pushgateway, "prometheus_client", "prometheus")]
        for wanted, module, extra in needs:
            if wanted is not None:
                require(module, extra, f"this needs {module}", load=False)
        if self.mlflow is not None:
            from dlopt.deploy.tracking import check_store

            check_store(self.mlflow)
        if self.metrics_file is not None:
            from dlopt.deploy.metrics_export import check_metrics_path

            check_metrics_path(self.metrics_file)
        if self.triton is not None and self.triton.exists() and not self.triton.is_dir():
            raise ConfigError(f"--triton {self.triton} exists and is not a folder")
        if self.kserve not in (None, KSERVE_DEFAULT):
            from dlopt.deploy.kserve import check_manifest_path

            check_manifest_path(Path(self.kserve))
        return self

    def kserve_path(self, model_name: str) -> Path | None:
        if self.kserve is None:
            return None
        if self.kserve == KSERVE_DEFAULT:
            return self.triton / f"{model_name}-inferenceservice.yaml"
        return Path(self.kserve)


def publish_options(command=None, *, triton: bool = True):
    """Decorate a click command with the publishing options; it receives ``publishing``.

    ``triton=False`` (for ``gate``) leaves out the Triton and KServe options.
    """
    def decorate(func):
        options = [
            click.option("--mlflow", "mlflow", default=None, is_flag=False, flag_value=MLFLOW_DEFAULT,
                         metavar="[TRACKING_URI]", help="Log an MLflow run (params, metrics, report, artefact) "
                         "to TRACKING_URI [default: MLflow's own, ./mlflow.db (SQLite), which mlflow ui "
                         "here opens; a path is a file store]."),
            click.option("--register", default=None, metavar="NAME",
                         help="With --mlflow: register the chosen artefact as a version of model NAME."),
            click.option("--mlflow-experiment", "experiment", default="dlopt", show_default=True,
                         help="MLflow experiment of the run."),
            click.option("--metrics-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                         help="Write the figures in Prometheus text format (node_exporter textfile collector)."),
            click.option("--pushgateway", default=None, metavar="URL",
                         help="Push the figures to a Prometheus Pushgateway (job dlopt)."),
            click.option("--publish-timeout", "publish_timeout", type=click.FloatRange(min=0, min_open=True),
                         default=PUBLISH_TIMEOUT_S, show_default=True, metavar="SECONDS",
                         help="Give up on --pushgateway and --mlflow (together) after this long; "
                              "the error names the step that was still waiting."),
        ]
        if triton:
            options = [
                click.option("--triton", type=click.Path(path_type=Path, file_okay=False), default=None,
                             metavar="REPO", help="Write the artefact into the Triton model repository REPO "
                             "(REPO/NAME/config.pbtxt, REPO/NAME/VERSION/model.*)."),
                click.option("--name", default=None, help="Triton model name [default: the model file's stem]."),
                click.option("--version", type=click.IntRange(min=1), default=1, show_default=True,
                             help="Triton model version (other versions dlopt wrote are kept)."),
                click.option("--max-batch-size", type=click.IntRange(min=0), default=None,
                             help="Triton max_batch_size [default: 8 with a symbolic batch axis, else 0]."),
                click.option("--kserve", default=None, is_flag=False, flag_value=KSERVE_DEFAULT, metavar="[FILE]",
                             help="With --triton: also write a KServe InferenceService for it "
                                  "[default: REPO/NAME-inferenceservice.yaml]."),
                *options,
            ]

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            values = {k: kwargs.pop(k) for k in ("triton", "name", "version", "max_batch_size", "kserve", "mlflow",
                                                 "register", "experiment", "metrics_file", "pushgateway",
                                                 "publish_timeout")
                      if k in kwargs}
            kwargs["publishing"] = PublishOptions(**values).check(triton_allowed=triton)
            return func(*args, **kwargs)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate(command) if command is not None else decorate


@dataclass
class Deadline:
    """One time limit shared by the publish step's network steps; the clock starts at the first."""

    seconds: float
    started: float | None = field(default=None)

    def left(self) -> float:
        if self.started is None:
            self.started = time.monotonic()
        return self.seconds - (time.monotonic() - self.started)


class _Doing:
    """What a bounded step is doing now: the step calls it with a phrase; the deadline reads it."""

    def __init__(self, doing: str):
        self.now = doing

    def __call__(self, doing: str) -> None:
        self.now = doing


def within(surface: str, deadline: Deadline, work: Callable[[Callable[[str], None]], object], *,
           doing: str) -> object:
    """``work(step)`` in a daemon thread, waited for until ``deadline``; its value or its exception.

    ``work`` calls ``step("uploading report.md")`` as it goes; when the deadline passes first, the
    thread is abandoned (it holds no lock and ends with the process) and TargetUnavailable names
    ``surface`` and what it was doing."""
    from dlopt.core.errors import TargetUnavailable

    step, box = _Doing(doing), {}
    left = deadline.left()
    if left <= 0:
        raise TargetUnavailable(f"{surface}: the {deadline.seconds:g} s of --publish-timeout were spent before it "
                                f"started ({doing}); raise --publish-timeout")

    def run() -> None:
        try:
            box["value"] = work(step)
        except BaseException as exc:  # handed to the waiting thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"dlopt-publish {surface}", daemon=True)
    thread.start()
    thread.join(left)
    if thread.is_alive():
        raise TargetUnavailable(f"{surface}: no complete answer within {deadline.seconds:g} s (--publish-timeout) "
                                f"while {step.now}; check that the server is up and answers, or raise "
                                f"--publish-timeout")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def deploy(report, out_dir: Path | None, publishing: PublishOptions, *, gate_results=None,
            artifact_dir: Path | None = None) -> list[str]:
    """Do what ``publishing`` asks with a finished compile's ``report`` (a Report or its dict) and
    output folder; returns what was done, one line each, for the CLI to print.

    ``artifact_dir``: the candidate Triton serves, when not the chosen one (a bundle/ folder);
    ``gate_results``: a gate's results, logged and exported beside the report's figures."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    out_dir = Path(out_dir) if out_dir is not None else None
    done: list[str] = []
    register = publishing.register
    if register is not None and gate_results is not None and not all(r.passed for r in gate_results):
        done.append(f"mlflow: not registering {register}: the gate failed")  # never register what failed its gate
        register = None
    if publishing.triton is not None:
        from dlopt.deploy.triton import write_repository

        model = write_repository(artifact_dir or out_dir, publishing.triton, name=publishing.name, version=publishing.version,
                                 max_batch_size=publishing.max_batch_size)
        done.append(f"triton: {model.folder}/config.pbtxt and {model.version}/{', '.join(model.files)} "
                    f"({model.config.platform or model.config.backend}, max_batch_size "
                    f"{model.config.max_batch_size}, {model.device_kind})")
        kserve = publishing.kserve_path(model.name)
        if kserve is not None:
            from dlopt.deploy.kserve import manifest, write_manifest

            write_manifest(kserve, manifest(model))
            done.append(f"kserve: {kserve} (InferenceService {manifest(model)['metadata']['name']}; set its "
                        f"storageUri to where you upload {publishing.triton})")
    if publishing.metrics_file is not None:
        from dlopt.deploy.metrics_export import write_metrics_file

        write_metrics_file(publishing.metrics_file, data, gate_results)
        done.append(f"metrics: {publishing.metrics_file}")
    deadline = Deadline(publishing.publish_timeout)  # starts with the first network step
    if publishing.pushgateway is not None:
        from dlopt.deploy.metrics_export import push_metrics

        url = publishing.pushgateway
        # a silent server: its own 10 s socket timeout, or the deadline when that comes first (never a race)
        within(f"--pushgateway {url}", deadline, doing="pushing the metrics",
               work=lambda step: push_metrics(url, data, gate_results, timeout=min(10.0, deadline.left() + 1.0)))
        done.append(f"metrics: pushed to {publishing.pushgateway}")
    if publishing.mlflow is not None:
        from dlopt.deploy.tracking import log_run, resolve_uri, upload_plan

        files = upload_plan(out_dir, data)  # checked before any request: a refusal logs nothing
        run = within(f"--mlflow {resolve_uri(publishing.mlflow)}", deadline, doing="connecting",
                     work=lambda step: log_run(data, out_dir, tracking_uri=publishing.mlflow, register=register,
                                               experiment=publishing.experiment, gate_results=gate_results,
                                               step=step, files=files))
        done.append(f"mlflow: run {run.run_id} in {run.tracking_uri}"
                    + (f"; registered {register} version {run.model_version}" if run.model_version else ""))
    return done

