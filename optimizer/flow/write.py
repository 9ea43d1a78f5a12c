"""The last two stages: assemble the report from what the earlier ones returned, then write it all.

``assemble`` is pure: it decides the output layout (which candidate sits at the top
level, which ship in ``bundle/``) and records it in the report.  ``write_output``
carries that layout out in the staging folder and renames it into place.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dlopt import __version__
from dlopt.core import precisions
from dlopt.core.artifacts import FILE_HASHES, MANIFEST, file_hashes, move_into_place, published_entries
from dlopt.core.model_io import save_ir, sha256_file
from dlopt.core.precisions import Status
from dlopt.core.shapes import describe
from dlopt.device.device_check import DEVICE_REPORT
from dlopt.device.device_files import write_device_files
from dlopt.flow.select import ORIGINAL_MARGIN
from dlopt.measure.timing import RESOLUTION_MS
from dlopt.report import sections
from dlopt.report.data import Candidate, Measurement, Report
from dlopt.report.sections import mcu as mcu_section
from dlopt.report.html import render_html
from dlopt.report.readme import README, render_readme
from dlopt.report.summary import summarize

CALIBRATION_FILE = "calibration.json"


def _speedup_interval(original, timing) -> tuple[float, float] | None:
    if original is None or timing is None or not timing.ci_low_ms > 0:
        return None
    return original.ci_low_ms / timing.ci_high_ms, original.ci_high_ms / timing.ci_low_ms


def summary_line(report: Report) -> str:
    """One sentence that answers the question: what shipped, how much faster, what it cost."""
    chosen = next((c for c in report.candidates if c.artifact_dir == "."), None)
    if chosen is None:
        return "nothing shipped"
    timing = report.timing or {}
    parts = [f"chosen {chosen.key}"]
    speed = report.speedup(chosen)
    interval = (chosen.measurement.latency or {}).get("speedup_ci") if chosen.measurement else None
    if speed:
        ci = f" (95% CI {interval[0]:.2f}-{interval[1]:.2f})" if interval else ""
        runs = f"{timing['cut']} (interleaved)" if timing.get("cut") else f"{timing.get('runs', '?')} interleaved runs"
        parts.append(f"{speed:.2f}x the original's speed{ci} at {timing.get('shape', '?')}, "
                     f"{timing.get('threads', '?')} threads, {runs}")
    elif chosen.measurement and (chosen.measurement.latency or {}).get("measured_on"):
        lat = chosen.measurement.latency
        parts.append(f"p50 {lat['p50_ms']:.3f} ms (95% CI {lat['ci_low_ms']:.3f}-{lat['ci_high_ms']:.3f}) at "
                     f"{timing.get('shape', '?')}, measured on {lat['measured_on']} ({lat['runs']} runs)")
    elif chosen.status != "ok":  # rejected: only candidates within the budget are timed
        parts.append("not timed (no candidate met the accuracy budget)")
    elif chosen.mcu:
        parts.append(mcu_section.shipped(chosen.mcu))
    else:
        parts.append(f"not timed: built for {report.target['name']}, not yet measured on the device "
                     f"(run `dlopt bench` there)")
    if chosen.score:
        parts.append(f"{chosen.score.metric} {0.0 - chosen.score.drop_pp:+.2f} points {_data_words(report)}")
    if chosen.measurement and report.baseline.size_bytes:
        size = chosen.measurement.size_bytes
        parts.append(f"size {size / report.baseline.size_bytes:.2f}x ({report.baseline.size_bytes / 1e6:.2f} MB -> "
                     f"{size / 1e6:.2f} MB)")
    pruned = report.pruning()
    if pruned:
        parts.append(pruned)
    if speed and (report.verdict or {}).get("faster_than_original") is False:
        parts.append(f"not a real difference from the original (under a {ORIGINAL_MARGIN:.0%} margin or the "
                     f"{RESOLUTION_MS * 1e3:.0f} us timing resolution)" if speed < 1 else
                     (report.verdict or {}).get("speed") or "not significantly faster than the original")
    if not report.chosen:
        parts.append("OVER THE ACCURACY BUDGET")
    return "; ".join(parts)


def _data_words(report: Report) -> str:
    """What the verdict rests on: so many evaluation samples, or random inputs (said as such)."""
    data = report.evaluation or {}
    samples = data.get("samples")
    if str(data.get("source", "")).startswith("random"):
        return f"on {samples} random inputs (no --eval: a verdict on random data, not the task's)"
    return f"on {samples} evaluation samples"


def assemble(job, ev, generic, builds, measured, verdict, notes: list[str], *, over_budget: bool) -> Report:
    """The report of this compile; candidates carry their timing, verdict and place in the output."""
    shipped_elsewhere = not job.profile.runs_here()
    candidates: list[Candidate] = []
    for b in builds.built:
        cand = b.candidate
        timing = measured.timings.get(cand.key)
        if timing is not None:
            latency = {**timing.to_dict(), "speedup_ci": _rounded(_speedup_interval(measured.original, timing))}
            cand = replace(cand, measurement=replace(cand.measurement, latency=latency,
                                                     energy=measured.energy.get(cand.key)))
        if cand.key == verdict.chosen:
            why = verdict.why if job.profile.runs_here() else "; ".join(r for r in (cand.reason, verdict.why) if r)
            cand = replace(cand, chosen=not over_budget, artifact_dir=".", reason=why)
        elif cand.status is Status.OK:
            why_not = verdict.reasons.get(cand.key)
            cand = replace(cand, reason="; ".join(r for r in (cand.reason, why_not) if r))
            if shipped_elsewhere and b.artifact is not None:
                cand = replace(cand, artifact_dir=f"bundle/{cand.backend}-{cand.precision}")
        candidates.append(cand)
    quantised_ships = any(c.artifact_dir and precisions.get(c.precision).quantised
                          for c in candidates if c.precision in precisions.REGISTRY)
    if quantised_ships and ev.ranges is not None:
        candidates = [replace(c, artifact_files=[*c.artifact_files, CALIBRATION_FILE]) if c.artifact_dir == "." else c
                      for c in candidates]
    kept = [c.artifact_dir for c in candidates if c.artifact_dir and c.artifact_dir != "."]
    if kept:
        notes = [*notes, f"latency cannot be measured here, so every candidate built ships: {', '.join(kept)} "
                         f"(the chosen one, by precision preference, is at the top level)"]
    config = job.config
    original = measured.original
    timing_info = {"shapes": {k: list(v) for k, v in job.shapes.items()}, "shape": describe(job.shapes),
                   "threads": config.timing.thread_count, "runs": original.runs if original else None,
                   "warmup": original.warmup if original else None, "interleaved": original is not None,
                   "noise_cv": round(max([t.cv for t in measured.timings.values()] + [original.cv]), 4)
                   if original else None,
                   "runs_requested": original.runs_requested if original else None,
                   "budget_s": original.budget_s if original else None, "cut": original.cut if original else None}
    report = Report.with_sections(
        sections.collect(job, ev, builds),
        model={**job.info, **summarize(job.proto, include_histogram=False)},
        target={"name": job.profile.name, "description": job.profile.description, "arch": job.profile.arch,
                "triple": job.profile.triple, "backends": list(job.profile.backends)},
        precision=config.precision,
        evaluation={"source": ev.data.source, "feeds": len(ev.data.feeds), "samples": ev.data.samples,
                    "labelled": bool(ev.data.labels), **_data_hash(config.data.inputs)},
        baseline=Measurement(original.to_dict() if original else None, job.info["size_bytes"],
                             ev.accuracy(list(ev.reference)), measured.original_energy),
        budget={"metric": ev.scorer.name, "units": ev.scorer.units, "original": round(ev.scorer.original, 6),
                "max_drop_pp": config.budget.max_accuracy_drop},
        passes=[r.to_dict() for r in generic.records],
        candidates=candidates,
        chosen=None if over_budget else verdict.chosen,
        output_dir=str(job.out),
        dlopt_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        search=builds.search,
        notes=[*notes, *verdict.notes, *(ev.cache.warnings if ev.cache else [])],
        timing=timing_info,
        verdict={"why": verdict.why, "ties": list(verdict.ties), "faster_than_original": verdict.faster_than_original,
                 "speed": verdict.speed},
    )
    return replace(report, summary=summary_line(report))


def _data_hash(inputs) -> dict:
    """The sha256 of an --eval file, so a gate knows the same data at another path (a regular file only)."""
    if not isinstance(inputs, (str, Path)) or not Path(inputs).is_file():
        return {}

    return {"sha256": sha256_file(Path(inputs))}


def _rounded(pair):
    return [round(pair[0], 3), round(pair[1], 3)] if pair else None


def write_output(job, ev, builds, verdict, report: Report, staged: Path) -> None:
    """Lay out ``staged`` as ``report`` describes it, write the reports and manifest, rename into place."""
    by_key = {b.candidate.key: b for b in builds.built}
    for cand in report.candidates:
        built = by_key[cand.key]
        if cand.artifact_dir == ".":
            for f in built.artifact.files:
                (built.artifact.folder / f).rename(staged / f)
            if "model.onnx" not in built.artifact.files and built.model is not None:
                # Whatever the backend, the optimised ONNX it was built from ships too: inspectable, portable.
                save_ir(built.model, staged / "model.onnx")
        elif cand.artifact_dir:
            folder = staged / cand.artifact_dir
            folder.parent.mkdir(exist_ok=True)
            built.artifact.folder.rename(folder)
    chosen = next(c for c in report.candidates if c.artifact_dir == ".")
    if ev.ranges is not None and CALIBRATION_FILE not in chosen.artifact_files:
        ev.ranges.unlink(missing_ok=True)
    shutil.rmtree(staged / "candidates", ignore_errors=True)

    write_device_files(staged, ev, report, [o.name for o in job.proto.graph.output])
    (staged / "report.json").write_text(report.to_json())
    (staged / "report.md").write_text(report.to_markdown())

    (staged / "report.html").write_text(render_html(report.to_dict()))
    manifest = _manifest(job, report, chosen)

    (staged / README).write_text(render_readme(report.to_dict(), manifest, staged))
    # What a later run may replace; device_report.json is written later, on the device, by
    # `dlopt bench` or run_candidates.py, into this folder.
    manifest["published"] = sorted({*published_entries(staged), MANIFEST, DEVICE_REPORT})
    # Native code (a TVM model.so, C sources) is loaded only when its files still match these.
    manifest[FILE_HASHES] = file_hashes(staged, artefact_files(report))
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    move_into_place(staged, job.out)


def artefact_files(report: Report) -> list[str]:
    """Every shipped candidate's files, relative to the output: the top-level one's (and the ONNX it
    was built from) and each bundle folder."""
    chosen = next(c for c in report.candidates if c.artifact_dir == ".")
    top = [*chosen.artifact_files, *(f for f in ("model.onnx", "model.onnx.data") if f not in chosen.artifact_files)]
    return top + sorted({c.artifact_dir for c in report.candidates if c.artifact_dir and c.artifact_dir != "."})


def _manifest(job, report: Report, chosen: Candidate) -> dict:
    import onnxruntime
    import onnxscript

    config = job.config
    return {
        "schema_version": report.schema_version,
        "dlopt_version": __version__,
        "created": report.created,
        "input_model": {k: job.info[k] for k in ("path", "sha256", "size_bytes")},
        "target": job.profile.name,
        "backend": chosen.backend,
        "precision": chosen.precision,
        "files": chosen.artifact_files,
        "bundle": {c.key: c.artifact_dir for c in report.candidates if c.artifact_dir and c.artifact_dir != "."},
        "float_nodes": [n["name"] for n in chosen.float_nodes],
        "passes": [p["name"] for p in report.passes] + [p["name"] for p in chosen.passes],
        "timing_shapes": report.timing["shapes"],
        "options": {"precision": config.precision, "threads": config.timing.thread_count, "samples": config.data.samples,
                    "runs": config.timing.runs, "warmup": config.timing.warmup, "seed": config.data.seed, "batch": config.timing.batch,
                    "shapes": {k: list(v) for k, v in (config.timing.shapes or {}).items()},
                    "metric": config.budget.metric if isinstance(config.budget.metric, str) or config.budget.metric is None
                    else getattr(config.budget.metric, "__name__", "function"),
                    "inputs": str(config.data.inputs) if isinstance(config.data.inputs, (str, Path)) else None,
                    "calib": str(config.data.calib) if isinstance(config.data.calib, (str, Path)) else None,
                    "calib_samples": config.data.calib_samples, "calib_method": config.data.calib_method,
                    "max_accuracy_drop": config.budget.max_accuracy_drop, "search_time": config.budget.search_time,
                    "prune": config.prune},
        "versions": {"python": platform.python_version(), "onnx": onnx.__version__,
                     "onnx_ir": ir.__version__, "onnxscript": onnxscript.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
    }
