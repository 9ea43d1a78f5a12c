"""A compile's (or a gate's) figures in Prometheus exposition format, written with ``prometheus-client``.

``figures(report)`` is the one list of numbers a report yields; MLflow (``dlopt.deploy.tracking``) logs
the same list.  ``write_metrics_file`` writes it for node_exporter's textfile collector through
dlopt's own atomic writer (``artifacts.write_file``: an O_EXCL temporary file renamed over the
path, so the collector never reads half a file and a link planted in a shared textfile folder is
never written through; prometheus-client's ``write_to_textfile`` opens ``NAME.<pid>.<thread>``
with a plain ``open()``); ``push_metrics`` sends it to a Pushgateway.  Units are Prometheus' base units (seconds, bytes,
joules); labels say which model, target and candidate a figure belongs to.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass
from pathlib import Path

from dlopt.core.artifacts import write_file
from dlopt.core.errors import ConfigError, first_line
from dlopt.core.optional import require

PREFIX = "dlopt_"
JOB = "dlopt"


@dataclass(frozen=True)
class Figure:
    """One number of a report: ``name`` in the report's units, for ``candidate`` ("original" or "ort/fp32")."""

    name: str  # latency_p50_ms | latency_p99_ms | speedup | accuracy_drop_pp | size_bytes | energy_j
    value: float
    candidate: str
    chosen: bool = False


def figures(report: dict) -> list[Figure]:
    """The original's and every measured candidate's figures (skipping what was not measured)."""
    out: list[Figure] = []

    def add(name: str, value, candidate: str, chosen: bool = False) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Figure(name, float(value), candidate, chosen))

    base = report.get("baseline") or {}
    for name, value in _measurement(base).items():
        add(name, value, "original")
    for cand in report.get("candidates") or []:
        if cand.get("status") != "ok":
            continue
        key, chosen = f"{cand['backend']}/{cand['precision']}", bool(cand.get("chosen"))
        for name, value in _measurement(cand.get("measurement") or {}).items():
            add(name, value, key, chosen)
        add("speedup", cand.get("speedup"), key, chosen)
        add("accuracy_drop_pp", (cand.get("score") or {}).get("drop_pp"), key, chosen)
    return out


def _measurement(m: dict) -> dict:
    latency, energy = m.get("latency") or {}, m.get("energy") or {}
    return {"latency_p50_ms": latency.get("p50_ms"), "latency_p99_ms": latency.get("p99_ms"),
            "size_bytes": m.get("size_bytes"), "energy_j": energy.get("joules_per_inference")}


def _client():
    return require("prometheus_client", "prometheus", "--metrics-file and --pushgateway need prometheus-client")


def registry_for(report: dict, gate_results=None):
    """A CollectorRegistry holding the report's figures (and the gate's results, when given)."""
    from pathlib import PurePath

    prom = _client()
    registry = prom.CollectorRegistry()
    model = PurePath(str((report.get("model") or {}).get("path") or "model")).name
    target = str((report.get("target") or {}).get("name") or "")
    common = {"model": model, "target": target}
    labels = [*common, "candidate", "backend", "precision", "chosen"]

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()):
        return prom.Gauge(PREFIX + name, doc, [*labels, *extra], registry=registry)

    latency = gauge("latency_seconds", "Latency at the report's timing shape", ("quantile",))
    speedup = gauge("speedup_ratio", "p50 latency of the original over the candidate's")
    drop = gauge("accuracy_drop_points", "Accuracy drop in percentage points of the report's metric")
    size = gauge("artifact_size_bytes", "Size of the model files")
    energy = gauge("energy_joules_per_inference", "Energy per inference (measured or estimated)")
    for f in figures(report):
        backend, _, precision = f.candidate.partition("/")
        values = {**common, "candidate": f.candidate, "backend": backend if precision else "original",
                  "precision": precision or "fp32", "chosen": "true" if f.chosen else "false"}
        if f.name.startswith("latency_"):
            quantile = "0.5" if f.name == "latency_p50_ms" else "0.99"
            latency.labels(**values, quantile=quantile).set(f.value / 1e3)
        else:
            {"speedup": speedup, "accuracy_drop_pp": drop, "size_bytes": size,
             "energy_j": energy}[f.name].labels(**values).set(f.value)
    info = prom.Gauge(PREFIX + "report_timestamp_seconds", "When the report was written",
                      [*common, "chosen_candidate"], registry=registry)
    info.labels(**common, chosen_candidate=str(report.get("chosen") or "none")).set(_timestamp(report))
    if gate_results is not None:
        passed = prom.Gauge(PREFIX + "gate_passed", "1 when the gate held (or was skipped), 0 when it failed",
                            [*common, "gate", "status"], registry=registry)
        measured = prom.Gauge(PREFIX + "gate_measured", "The figure a gate checked, in its unit",
                              [*common, "gate", "unit"], registry=registry)
        for r in gate_results:
            passed.labels(**common, gate=r.name, status=r.status).set(1 if r.passed else 0)
            if r.measured is not None:
                measured.labels(**common, gate=r.name, unit=r.unit).set(r.measured)
    return registry


def _timestamp(report: dict) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(report.get("created"))).timestamp()
    except ValueError:
        return float("nan")


def check_metrics_path(path: Path) -> None:
    """Refuse, before any work, a --metrics-file that is a folder or a file of someone else's metrics."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--metrics-file {path} is a folder; give a file such as {path / 'dlopt.prom'}")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ConfigError(f"--metrics-file {path} is a link or not a regular file; give a file path")
    if path.is_file() and not _ours(path):
        raise ConfigError(f"--metrics-file {path} exists and holds metrics dlopt did not write; give another path")
    if not path.parent.is_dir():
        raise ConfigError(f"--metrics-file {path}: the folder {path.parent} does not exist")


def _ours(path: Path) -> bool:
    """True for an empty file or one whose every metric family is dlopt's."""
    _client()
    from prometheus_client.parser import text_string_to_metric_families  # not imported by the package

    try:
        text = path.read_text()
        families = list(text_string_to_metric_families(text))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return all(f.name.startswith(PREFIX) for f in families)


def write_metrics_file(path: Path, report: dict, gate_results=None) -> Path:
    """Write the figures to ``path`` whole (temporary file and rename); only over a file dlopt wrote."""
    path = Path(path)
    check_metrics_path(path)
    text = _client().generate_latest(registry_for(report, gate_results)).decode("utf-8")
    try:
        write_file(path, text)
    except OSError as exc:
        raise ConfigError(f"--metrics-file {path} cannot be written: {exc.strerror or exc}") from exc
    return path


def push_metrics(url: str, report: dict, gate_results=None, *, timeout: float = 10.0) -> None:
    """PUT the figures to the Pushgateway at ``url`` (job "dlopt", grouped by model and target)."""
    from pathlib import PurePath

    prom = _client()
    registry = registry_for(report, gate_results)
    grouping = {"model": PurePath(str((report.get("model") or {}).get("path") or "model")).name,
                "target": str((report.get("target") or {}).get("name") or "")}
    try:
        prom.push_to_gateway(url, job=JOB, registry=registry, grouping_key=grouping, timeout=timeout)
    except OSError as exc:  # URLError, HTTPError, refused connections
        raise ConfigError(f"--pushgateway {url}: cannot push the metrics: {first_line(exc)}") from exc
    except http.client.HTTPException as exc:  # BadStatusLine and kin: something answered, not in HTTP
        said = "".join(c if c.isprintable() else "?" for c in first_line(exc, 80))  # no terminal escapes
        raise ConfigError(f"--pushgateway {url}: cannot push the metrics: the server's answer is not HTTP "
                          f"({type(exc).__name__}: {said}); is {url} a Pushgateway?") from exc
    except ValueError as exc:  # urllib: a URL it cannot use
        raise ConfigError(f"--pushgateway {url}: cannot push the metrics: {first_line(exc)}") from exc
