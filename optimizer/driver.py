"""compile(config) -> Report: the one-way flow from model to published artefacts.

load + check -> resolve target -> reference outputs -> generic passes ->
per backend: backend passes, compile, evaluate -> choose -> write atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dlopt import __version__
from dlopt.artifacts import MANIFEST, check_output_dir, publish, staging_dir
from dlopt.config import CompileConfig
from dlopt.errors import CompileError, DloptError, first_line
from dlopt.evaluate import TOLERANCE, compare, input_specs, measure_latency, random_feeds, top1_accuracy
from dlopt.model_io import check_proto, load_ir, read_model_proto, save_ir, sha256_file
from dlopt.pipeline import run_pipeline
from dlopt.profiles import TargetProfile, resolve_target
from dlopt.report import Candidate, Measurement, Report
from dlopt.summary import summarize

logger = logging.getLogger(__name__)


class _Feeds:
    """The evaluation feeds every model sees, and their labels when known."""

    def __init__(self, config: CompileConfig, proto: onnx.ModelProto) -> None:
        specs = input_specs(proto)
        if config.inputs is not None:
            from dlopt.calibration import NpzDataset

            data = NpzDataset(config.inputs, specs)
            self.feeds = list(data)
            self.labels = data.label_batches()
            self.source = str(config.inputs)
        else:
            self.feeds = random_feeds(specs, config.samples, config.seed)
            self.labels = []
            self.source = f"random (seed {config.seed})"


def _load(config: CompileConfig) -> tuple[onnx.ModelProto, ir.Model, dict]:
    model = config.model
    if isinstance(model, onnx.ModelProto):
        check_proto(model)
        data = model.SerializeToString()
        import hashlib

        info = {"path": None, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
        return model, ir.serde.deserialize_model(model), info
    path = Path(model)
    proto = read_model_proto(path)
    info = {"path": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    return proto, load_ir(path), info


class _Runner:
    """Runs a session over the feeds and times it, reporting progress."""

    def __init__(self, config: CompileConfig, feeds: _Feeds) -> None:
        self.config = config
        self.feeds = feeds

    def _progress(self, stage: str, done: int, total: int) -> None:
        if self.config.progress is not None:
            self.config.progress(stage, done, total)

    def evaluate(self, session, label: str, size_bytes: int, *, timed: bool = True) -> tuple[list, Measurement]:
        """Outputs on every feed; latency only when ``timed`` (this host is the target)."""
        outputs = []
        for i, feed in enumerate(self.feeds.feeds):
            outputs.append(session.run(feed))
            self._progress(f"{label}: outputs", i + 1, len(self.feeds.feeds))
        latency = None
        if timed:
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                self._progress(f"{label}: latency", done[0], self.config.runs)

            latency = measure_latency(
                session.run, self.feeds.feeds[0], runs=self.config.runs, warmup=self.config.warmup,
                threads=self.config.thread_count, progress=tick,
            ).to_dict()
        accuracy = None
        if self.feeds.labels:
            accuracy = top1_accuracy((o[0] for o in outputs), self.feeds.labels)
        return outputs, Measurement(latency, size_bytes, accuracy)


def _build_candidate(name, model, profile, config, runner, workdir, reference) -> tuple[Candidate, object]:
    from dlopt.targets import backend_status, get_backend

    status = backend_status(name)
    if status is not True:
        return Candidate(name, config.precision, "unavailable", reason=str(status)), None
    backend = get_backend(name)
    unsupported = backend.supports(model)
    if unsupported:
        return Candidate(name, config.precision, "unsupported",
                         reason=f"unsupported ops: {', '.join(unsupported)}"), None
    try:
        result = run_pipeline(model.clone(), backend.passes())
        artifact = backend.compile(result.model, profile, workdir, threads=config.thread_count)
    except DloptError as exc:
        return Candidate(name, config.precision, "failed", reason=str(exc)), None
    cand = Candidate(name, artifact.precision, "ok", passes=[r.to_dict() for r in result.records],
                     artifact_files=list(artifact.files))
    if not artifact.loadable_here:
        cand.measurement = Measurement(None, artifact.size_bytes())
        cand.reason = f"built for {profile.name}; cannot run on this machine, not verified or timed"
        return cand, artifact
    timed = profile.runs_here()
    if not timed:
        cand.reason = f"outputs verified on this machine; latency not measured (needs a {profile.name} device)"
    try:
        session = backend.load(artifact)
        outputs, cand.measurement = runner.evaluate(session, name, artifact.size_bytes(), timed=timed)
    except Exception as exc:  # a runtime refusing the artefact is a result, not a crash
        cand.status, cand.reason = "failed", f"could not run: {first_line(exc)}"
        return cand, None
    fidelity = compare(reference, outputs)
    cand.fidelity = fidelity.to_dict()
    limit = TOLERANCE[cand.precision]
    if not fidelity.max_rel_error <= limit:
        cand.status = "rejected"
        cand.reason = f"max relative error {fidelity.max_rel_error:.2e} over the {cand.precision} limit {limit:.0e}"
    return cand, artifact


def _choose(candidates: list[Candidate]) -> Candidate | None:
    ok = [c for c in candidates if c.status == "ok" and c.measurement is not None]
    timed = [c for c in ok if c.measurement.latency]
    pool = timed or ok
    if not pool:
        return None
    best = min(pool, key=lambda c: c.measurement.latency["p50_ms"] if c.measurement.latency else 0.0)
    for c in ok:
        if c is not best and not c.reason:
            c.reason = f"slower than {best.key}"
    best.chosen = True
    return best


def _manifest(config: CompileConfig, profile: TargetProfile, info: dict, report: Report, chosen: Candidate) -> dict:
    import onnxruntime
    import onnxscript

    return {
        "schema_version": "1.0",
        "dlopt_version": __version__,
        "created": report.created,
        "input_model": {"path": info["path"], "sha256": info["sha256"], "size_bytes": info["size_bytes"]},
        "target": profile.name,
        "backend": chosen.backend,
        "precision": chosen.precision,
        "files": chosen.artifact_files,
        "passes": [p["name"] for p in report.passes] + [p["name"] for p in chosen.passes],
        "options": {"precision": config.precision, "threads": config.thread_count, "samples": config.samples,
                    "runs": config.runs, "warmup": config.warmup, "seed": config.seed,
                    "inputs": str(config.inputs) if config.inputs else None},
        "versions": {"python": platform.python_version(), "onnx": onnx.__version__,
                     "onnx_ir": ir.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


def compile(config: CompileConfig) -> Report:  # noqa: A001 - the verb users know
    profile = resolve_target(config.target)
    proto, model, info = _load(config)
    name = Path(info["path"]).stem if info["path"] else (proto.graph.name or "model")
    out = config.output_dir(name)
    check_output_dir(out)
    feeds = _Feeds(config, proto)
    runner = _Runner(config, feeds)

    from dlopt.targets.ort import OrtSession, session_settings

    reference_session = OrtSession(info["path"] or proto.SerializeToString(), session_settings(config.thread_count))
    reference, baseline = runner.evaluate(reference_session, "original", info["size_bytes"])

    generic = run_pipeline(model, _generic_passes())
    candidates: list[Candidate] = []
    with staging_dir(out) as staged:
        artifacts = {}
        for backend_name in profile.backends:
            cand, artifact = _build_candidate(
                backend_name, generic.model, profile, config, runner,
                staged / "candidates" / f"{backend_name}-{config.precision}", reference,
            )
            candidates.append(cand)
            artifacts[cand.key] = artifact
        chosen = _choose(candidates)
        if chosen is None:
            reasons = "; ".join(f"{c.backend}: {c.reason}" for c in candidates)
            raise CompileError(f"no backend of target {profile.name} produced a usable artefact ({reasons})")
        for f in artifacts[chosen.key].files:
            (staged / "candidates" / f"{chosen.backend}-{chosen.precision}" / f).rename(staged / f)
        import shutil

        shutil.rmtree(staged / "candidates")
        report = Report(
            model={**info, **summarize(proto, include_histogram=False)},
            target={"name": profile.name, "description": profile.description, "arch": profile.arch,
                    "triple": profile.triple, "backends": list(profile.backends)},
            precision=config.precision,
            evaluation={"source": feeds.source, "feeds": len(feeds.feeds), "labelled": bool(feeds.labels)},
            baseline=baseline,
            passes=[r.to_dict() for r in generic.records],
            candidates=candidates,
            chosen=chosen.key,
            output_dir=str(out),
            dlopt_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        (staged / MANIFEST).write_text(json.dumps(_manifest(config, profile, info, report, chosen), indent=2) + "\n")
        (staged / "report.json").write_text(report.to_json())
        (staged / "report.md").write_text(report.to_markdown())
        publish(staged, out)
    return report


def _generic_passes():
    from dlopt.passes import generic_passes

    return generic_passes()
