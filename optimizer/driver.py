"""compile(config) -> Report: the one-way flow from model to published artefacts.

load + check -> resolve target -> reference outputs -> generic passes ->
calibrate (if int8) -> per backend x precision: passes, compile, evaluate ->
mixed-precision search (if int8 misses the budget) -> choose -> write atomically.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dlopt import __version__
from dlopt.artifacts import (MANIFEST, check_output_dir, output_lock, publish, published_entries,
                             remove_stale_staging, resolve_output, staging_dir)
from dlopt.candidates import Bench, Built, Feeds, build
from dlopt.config import CompileConfig
from dlopt.errors import AccuracyBudgetExceeded, CompileError, DloptError, ModelError, first_line
from dlopt.evaluate import input_specs, random_feeds
from dlopt.model_io import check_proto, load_ir, read_model_proto, save_ir, sha256_file
from dlopt.pipeline import run_pipeline
from dlopt.profiles import TargetProfile, resolve_target
from dlopt.report import Candidate, Report
from dlopt.summary import summarize

logger = logging.getLogger(__name__)

# Precisions every backend is asked about; others a backend offers itself (OpenVINO's bf16)
# join the candidates under --precision auto.
KNOWN_PRECISIONS = ("fp32", "fp16", "int8", "mixed", "int8-dynamic")
# A lower precision must beat fp32 on the same backend by this share of fp32's p50 to be chosen:
# smaller gaps are within run-to-run noise and not worth the accuracy risk.
MIN_GAIN = 0.05
# When latency cannot be measured here, prefer the precision that is usually fastest on devices.
UNTIMED_PREFERENCE = ("int8", "mixed", "int8-dynamic", "fp16", "bf16", "fp32")


def _load(config: CompileConfig) -> tuple[onnx.ModelProto, ir.Model, dict]:
    model = config.model
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            model = onnx.load_model_from_string(bytes(model))
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ModelError(f"the bytes given as model are not a serialised ONNX model ({first_line(exc)})") from exc
    elif not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise ModelError(f"model must be an .onnx path, serialised ONNX bytes or an onnx.ModelProto, "
                         f"got {type(model).__name__}")
    if isinstance(model, onnx.ModelProto):
        check_proto(model)
        data = model.SerializeToString()
        info = {"path": None, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
        return model, ir.serde.deserialize_model(model), info
    path = Path(model)
    proto = read_model_proto(path)
    info = {"path": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    return proto, load_ir(path), info


def _eval_feeds(config: CompileConfig, specs) -> Feeds:
    if config.inputs is None:
        return Feeds(random_feeds(specs, config.random_samples, config.seed), [], f"random (seed {config.seed})")
    from dlopt.calibration import open_dataset

    data = open_dataset(config.inputs, specs, batch_size=32, limit=config.eval_limit)
    feeds, labels = [], []
    for feed, label in data.iter_with_labels():
        feeds.append(feed)
        if label is not None:
            labels.append(label)
    if labels and len(labels) != len(feeds):
        labels = []
    source = str(config.inputs) if isinstance(config.inputs, (str, Path)) else type(config.inputs).__name__
    return Feeds(feeds, labels, source)


def _precisions(config: CompileConfig, profile: TargetProfile, model: ir.Model) -> list[str]:
    if config.precision != "auto":
        return [config.precision]
    chosen = [p for p in ("fp32", "fp16", "int8") if p in profile.precisions]
    if "int8" in profile.precisions and _weights_in(model, ("MatMul", "Gemm")) > _weights_in(model, ("Conv", "ConvTranspose")):
        chosen.append("int8-dynamic")  # transformer/MLP-shaped: dynamic quantisation may win
    return chosen


def _weights_in(model: ir.Model, op_types: tuple[str, ...]) -> int:
    """Number of constant weight elements consumed by nodes of ``op_types``."""
    total = 0
    for node in model.graph:
        if node.op_type in op_types:
            total += sum(v.const_value.size for v in node.inputs[1:2] if v is not None and v.const_value is not None)
    return total


def _open_calibration(config: CompileConfig, specs):
    """Open (and so check names, dtypes and shapes of) the calibration data before any heavy work."""
    if config.calib is None:
        return None
    from dlopt.calibration import open_dataset

    return open_dataset(config.calib, specs, limit=config.calib_samples, preprocess=config.calib_preprocess)


def _calibrate(config: CompileConfig, bench: Bench, model: ir.Model, specs, calib_data, cache: Path,
               notes: list) -> dict:
    from dlopt.ranges import compute_ranges

    if calib_data is not None:
        data = calib_data
        source = str(config.calib) if isinstance(config.calib, (str, Path)) else type(config.calib).__name__
    elif config.inputs is not None:
        data, source = bench.feeds.feeds, f"the evaluation data ({bench.feeds.source})"
        notes.append("INT8 was calibrated on the evaluation data (no --calib): accuracy may look better than "
                     "on unseen data")
    else:
        data = random_feeds(specs, config.calib_samples, config.seed + 1)
        source = "random inputs"
        notes.append("INT8 was calibrated on random inputs (no --calib): pass representative data for "
                     "meaningful ranges")
    total = config.calib_samples
    stats = compute_ranges(ir.serde.serialize_model(model), data, cache, method=config.calib_method,
                           progress=lambda n: bench.progress("calibration", min(n, total), total))
    bench.progress("calibration", total, total)
    return {**stats.to_dict(), "source": source}


def _choose(candidates: list[Candidate], auto: bool) -> Candidate | None:
    ok = [c for c in candidates if c.status == "ok" and c.measurement is not None]
    fp32 = {c.backend: c.measurement.latency["p50_ms"] for c in ok if c.precision == "fp32" and c.measurement.latency}
    if auto:
        for c in ok:
            mine = c.measurement.latency
            limit = fp32.get(c.backend, 0.0) * (1 - MIN_GAIN)
            if c.precision != "fp32" and mine and c.backend in fp32 and mine["p50_ms"] > limit:
                c.status = "rejected"
                c.reason = (f"not faster than fp32 on {c.backend} ({mine['p50_ms']:.3f} ms vs "
                            f"{fp32[c.backend]:.3f} ms; needs {MIN_GAIN:.0%} less)")
        ok = [c for c in ok if c.status == "ok"]
    timed = [c for c in ok if c.measurement.latency]
    if timed:
        best = min(timed, key=lambda c: c.measurement.latency["p50_ms"])
    elif ok:
        best = min(ok, key=lambda c: UNTIMED_PREFERENCE.index(c.precision))
        best.reason = (best.reason + "; " if best.reason else "") + "chosen by precision preference (no latency here)"
    else:
        return None
    for c in ok:
        if c is not best and not c.reason:
            c.reason = f"slower than {best.key}"
    best.chosen = True
    return best


def _keep_bundle(candidates, builds, chosen, staged: Path, notes: list) -> None:
    """For a target that is not this machine, ship every candidate built: the device decides.

    The report says which were verified here (a fidelity figure) and which only run there.
    """
    for cand in candidates:
        artifact = builds[cand.key].artifact if cand.key in builds else None
        if cand is chosen or cand.status != "ok" or artifact is None:
            continue
        folder = staged / "bundle" / f"{cand.backend}-{cand.precision}"
        folder.parent.mkdir(exist_ok=True)
        artifact.folder.rename(folder)
        cand.artifact_dir = f"bundle/{folder.name}"
    kept = [c.artifact_dir for c in candidates if c.artifact_dir and c.artifact_dir != "."]
    if kept:
        notes.append(f"latency cannot be measured here, so every candidate built ships: {', '.join(kept)} "
                     f"(the chosen one, by precision preference, is at the top level)")


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
        "bundle": {c.key: c.artifact_dir for c in report.candidates if c.artifact_dir and c.artifact_dir != "."},
        "float_nodes": [n["name"] for n in chosen.float_nodes],
        "passes": [p["name"] for p in report.passes] + [p["name"] for p in chosen.passes],
        "options": {"precision": config.precision, "threads": config.thread_count, "samples": config.samples,
                    "runs": config.runs, "warmup": config.warmup, "seed": config.seed,
                    "inputs": str(config.inputs) if isinstance(config.inputs, (str, Path)) else None,
                    "calib": str(config.calib) if isinstance(config.calib, (str, Path)) else None,
                    "calib_samples": config.calib_samples, "calib_method": config.calib_method,
                    "max_accuracy_drop": config.max_accuracy_drop, "search_time": config.search_time},
        "versions": {"python": platform.python_version(), "onnx": onnx.__version__,
                     "onnx_ir": ir.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }


def _build_all(config, profile, bench, model, precisions, staged, notes) -> tuple[list[Candidate], dict[str, Built], dict | None]:
    from dlopt.mixed import search
    from dlopt.targets import backend_status, get_backend

    candidates: list[Candidate] = []
    builds: dict[str, Built] = {}
    search_info = None
    for backend in profile.backends:
        status = backend_status(backend)
        if status is not True:
            candidates.append(Candidate(backend, "-", "unavailable", reason=str(status)))
            continue
        offered = get_backend(backend).precisions(profile)
        extras = [p for p in offered if p not in KNOWN_PRECISIONS] if config.precision == "auto" else []
        for precision in [p for p in precisions if p in offered] + extras:
            built = build(bench, backend, precision, model, staged / "candidates" / f"{backend}-{precision}")
            candidates.append(built.candidate)
            builds[built.candidate.key] = built
            missed = built.candidate.status == "rejected" and built.candidate.score is not None
            if precision == "int8" and missed and built.model is not None:
                mixed, search_info = search(bench, backend, model, built.model,
                                            staged / "candidates" / f"{backend}-mixed")
                search_info["backend"] = backend
                if mixed is not None:
                    candidates.append(mixed.candidate)
                    builds[mixed.candidate.key] = mixed
                if not search_info["complete"]:
                    notes.append(f"mixed-precision search stopped at its {config.search_time:g} s limit; "
                                 f"the best model found by then is reported")
    return candidates, builds, search_info


def compile(config: CompileConfig) -> Report:  # noqa: A001 - the verb users know
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    profile = resolve_target(config.target, config.targets_file)
    proto, model, info = _load(config)
    name = Path(info["path"]).stem if info["path"] else (proto.graph.name or "model")
    out = resolve_output(config.output_dir(name))
    inputs = tuple(Path(p) for p in (info["path"], config.inputs, config.calib) if isinstance(p, (str, Path)))
    check_output_dir(out, inputs=inputs)
    with output_lock(out, wait=config.wait):
        check_output_dir(out, inputs=inputs)  # again: the compile that held the lock may have written it
        notes = [f"removed {entry}, left by an earlier compile that was killed" for entry in remove_stale_staging(out)]
        return _compile_locked(config, profile, proto, model, info, out, notes)


def _compile_locked(config: CompileConfig, profile: TargetProfile, proto: onnx.ModelProto, model: ir.Model,
                    info: dict, out: Path, notes: list[str]) -> Report:
    specs = input_specs(proto)
    calib_data = _open_calibration(config, specs)
    bench = Bench(config, profile, _eval_feeds(config, specs))
    if config.cache:
        from dlopt.cache import ArtifactCache

        bench.cache = ArtifactCache()

    from dlopt.targets.ort import OrtSession, session_settings

    try:
        reference = OrtSession(info["path"] or proto.SerializeToString(), session_settings(config.thread_count))
    except Exception as exc:  # the original must run to be compared with: that is the user's model
        raise ModelError(f"ONNX Runtime cannot run the original model: {first_line(exc)}") from exc
    try:
        baseline = bench.measure_original(reference, info["size_bytes"])
    except DloptError:
        raise
    except Exception as exc:  # e.g. a Gather index out of range on random inputs
        raise ModelError(f"ONNX Runtime cannot run the original model on the "
                         f"{'evaluation' if config.inputs is not None else 'random'} inputs: {first_line(exc)}"
                         + ("" if config.inputs is not None else "; pass representative data with --eval")) from exc
    del reference  # its idle worker threads would compete with the candidates being timed
    from dlopt.passes import generic_passes

    generic = run_pipeline(model, generic_passes())
    precisions = _precisions(config, profile, generic.model)
    with staging_dir(out) as staged:
        calibration = None
        if any(p in ("int8", "mixed") for p in precisions):
            bench.ranges = staged / "calibration.json"
            calibration = _calibrate(config, bench, generic.model, specs, calib_data, bench.ranges, notes)
        candidates, builds, search_info = _build_all(config, profile, bench, generic.model, precisions,
                                                        staged, notes)
        chosen = _choose(candidates, auto=config.precision == "auto")
        over_budget = None
        if chosen is None:
            scored = [c for c in candidates if c.score is not None and builds.get(c.key) is not None
                      and builds[c.key].artifact is not None]
            if not scored:
                reasons = "; ".join(f"{c.key}: {c.reason}" for c in candidates)
                raise CompileError(f"no backend of target {profile.name} produced a usable artefact ({reasons})")
            # Nothing met the budget: keep the closest so the work is not lost, and fail loudly.
            chosen = min(scored, key=lambda c: c.score["drop_pp"])
            over_budget = chosen
            notes.append(f"no candidate met the accuracy budget; {chosen.key} (closest) was written anyway")
        artifact = builds[chosen.key].artifact
        for f in artifact.files:
            (artifact.folder / f).rename(staged / f)
        chosen.artifact_dir = "."
        if "model.onnx" not in artifact.files and builds[chosen.key].model is not None:
            # Whatever the backend, the optimised ONNX it was built from ships too: inspectable, portable.
            save_ir(builds[chosen.key].model, staged / "model.onnx")
        if not profile.runs_here():
            _keep_bundle(candidates, builds, chosen, staged, notes)
        int8_shipped = any(c.artifact_dir and c.precision in ("int8", "mixed") for c in candidates)
        if int8_shipped and bench.ranges is not None:
            chosen.artifact_files.append(bench.ranges.name)  # the calibration table ships with the model
        elif bench.ranges is not None:
            bench.ranges.unlink(missing_ok=True)
        shutil.rmtree(staged / "candidates", ignore_errors=True)
        report = Report(
            model={**info, **summarize(proto, include_histogram=False)},
            target={"name": profile.name, "description": profile.description, "arch": profile.arch,
                    "triple": profile.triple, "backends": list(profile.backends)},
            precision=config.precision,
            evaluation={"source": bench.feeds.source, "feeds": len(bench.feeds.feeds),
                        "labelled": bool(bench.feeds.labels)},
            baseline=baseline,
            budget={"metric": bench.scorer.name, "original": round(bench.scorer.original, 6),
                    "max_drop_pp": config.max_accuracy_drop},
            passes=[r.to_dict() for r in generic.records],
            candidates=candidates,
            chosen=None if over_budget else chosen.key,
            output_dir=str(out),
            dlopt_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            calibration=calibration,
            search=search_info,
            notes=notes + (bench.cache.warnings if bench.cache else []),
        )
        (staged / "report.json").write_text(report.to_json())
        (staged / "report.md").write_text(report.to_markdown())
        from dlopt.html import render_html

        (staged / "report.html").write_text(render_html(report.to_dict()))
        manifest = _manifest(config, profile, info, report, chosen)
        manifest["published"] = sorted([*published_entries(staged), MANIFEST])  # what a later run may replace
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        publish(staged, out)
    if over_budget is not None:
        error = AccuracyBudgetExceeded(
            f"no candidate kept {bench.scorer.name} within {config.max_accuracy_drop} points "
            f"(closest: {over_budget.key}, {over_budget.score['drop_pp']:.2f} points); it was written to {out} "
            f"with its report")
        error.report = report
        raise error
    return report
