"""Build one (backend, precision) candidate from the float model and judge it.

Every candidate sees the same feeds as the original; it is compiled into its own
folder, run, compared with the original's outputs, scored against the accuracy
budget and (when this host is the target) timed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx_ir as ir

from dlopt.budget import Scorer
from dlopt.config import CompileConfig
from dlopt.errors import DloptError, first_line
from dlopt.evaluate import FP32_TOLERANCE, compare, measure_latency, top1_accuracy
from dlopt.pipeline import run_pipeline
from dlopt.profiles import TargetProfile
from dlopt.report import Candidate, Measurement


@dataclass
class Feeds:
    """The evaluation feeds every model sees, their labels when known, and where they came from."""

    feeds: list[dict[str, np.ndarray]]
    labels: list[np.ndarray]
    source: str


@dataclass
class Built:
    candidate: Candidate
    artifact: object | None = None
    outputs: list | None = None
    model: ir.Model | None = None  # the ONNX model after its passes (what the backend compiled)


@dataclass
class Bench:
    """What every candidate is measured with: config, target, feeds, reference outputs."""

    config: CompileConfig
    profile: TargetProfile
    feeds: Feeds
    reference: list = field(default_factory=list)
    scorer: Scorer | None = None
    ranges: Path | None = None  # calibration cache for int8
    cache: object | None = None  # dlopt.cache.ArtifactCache, or None to always build
    baseline_latency: dict | None = None  # the original's, once measured

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.config.progress is not None:
            self.config.progress(stage, done, total)

    def outputs(self, session, label: str, limit: int | None = None) -> list:
        feeds = self.feeds.feeds[:limit] if limit else self.feeds.feeds
        outputs = []
        for i, feed in enumerate(feeds):
            outputs.append(session.run(feed))
            self.progress(f"{label}: outputs", i + 1, len(feeds))
        return outputs

    def latency(self, session, label: str, *, profile: TargetProfile | None = None) -> tuple[dict, dict]:
        """Latency percentiles and energy per inference (measured or estimated, labelled) of ``session``.

        ``profile`` is what runs it: the target's by default, the host CPU for the original.
        """
        from dlopt.energy import EnergyMeter

        profile = profile or self.profile
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            self.progress(f"{label}: latency", done[0], self.config.runs)

        meter = EnergyMeter(profile, measure_here=profile.runs_here())
        latency = measure_latency(
            session.run, self.feeds.feeds[0], runs=self.config.runs, warmup=self.config.warmup,
            threads=self.config.thread_count, progress=tick, meter=meter,
        )
        self.progress(f"{label}: latency", self.config.runs, self.config.runs)  # slow models time fewer runs
        return latency.to_dict(), meter.result(latency.runs, meter.window_s, meter.cpu_s)

    def accuracy(self, outputs: list) -> float | None:
        if not self.feeds.labels or len(outputs) != len(self.feeds.labels):
            return None
        return top1_accuracy((o[0] for o in outputs), self.feeds.labels)

    def measure_original(self, session, size_bytes: int) -> Measurement:
        self.reference = self.outputs(session, "original")
        self.scorer = Scorer(self.reference, self.feeds.labels, self.config.metric)
        from dlopt.profiles import resolve_target

        # The original always runs on this machine's CPU (ONNX Runtime), whatever the target.
        latency, energy = self.latency(session, "original", profile=resolve_target("cpu"))
        self.baseline_latency = latency
        return Measurement(latency, size_bytes, self.accuracy(self.reference), energy)


def precision_passes(bench: Bench, precision: str, exclude: tuple[str, ...], only: tuple[str, ...] = ()) -> list:
    """The passes that turn the float model into ``precision`` (table, not if-chains at call sites)."""
    from dlopt.passes.fp16 import ConvertFloat16Pass
    from dlopt.passes.quantize_dynamic import QuantizeDynamicPass
    from dlopt.passes.quantize_static import QuantizeStaticPass

    table: dict[str, Callable[[], list]] = {
        "fp32": list,
        "fp16": lambda: [ConvertFloat16Pass()],
        "int8": lambda: [QuantizeStaticPass(ranges=bench.ranges, exclude_nodes=exclude,
                                            symmetric_activations=bench.profile.int8_symmetric)],
        "mixed": lambda: [QuantizeStaticPass(ranges=bench.ranges, exclude_nodes=exclude, only_nodes=only,
                                             symmetric_activations=bench.profile.int8_symmetric)],
        "int8-dynamic": lambda: [QuantizeDynamicPass()],
        "bf16": list,  # a runtime setting of the backend, not a graph change
    }
    return table[precision]()


def build(
    bench: Bench,
    backend_name: str,
    precision: str,
    model: ir.Model,
    workdir: Path,
    *,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    timed: bool = True,
    limit: int | None = None,
) -> Built:
    """Compile, run, compare, score and (if ``timed`` and possible) time one candidate.

    ``limit`` evaluates on the first feeds only (the mixed-precision search's quick
    trials); such a candidate is never published.
    """
    from dlopt.targets import backend_status, get_backend

    status = backend_status(backend_name)
    if status is not True:
        return Built(Candidate(backend_name, precision, "unavailable", reason=str(status)))
    backend = get_backend(backend_name)
    unsupported = backend.supports(model)
    if unsupported:
        return Built(Candidate(backend_name, precision, "unsupported",
                               reason=f"unsupported ops: {', '.join(unsupported)}"))
    try:
        # A backend that converts a precision itself (OpenVINO compresses weights to fp16) gets the float model.
        own = getattr(backend, "OWN_PRECISIONS", ())
        passes = ([] if precision in own else precision_passes(bench, precision, exclude, only)) + backend.passes(precision)
        result = run_pipeline(model.clone(), passes)
        artifact = _compile_cached(bench, backend, result.model, workdir, precision)
    except DloptError as exc:
        return Built(Candidate(backend_name, precision, "failed", reason=str(exc)))
    cand = Candidate(backend_name, precision, "ok", passes=[r.to_dict() for r in result.records],
                     artifact_files=list(artifact.files))
    if not artifact.loadable_here and artifact.check_onnx is None:
        cand.measurement = Measurement(None, artifact.size_bytes())
        cand.reason = f"built for {bench.profile.name}; cannot run on this machine, not verified or timed"
        return Built(cand, artifact, model=result.model)
    timed = timed and bench.profile.runs_here() and artifact.loadable_here
    try:
        if artifact.loadable_here:
            session = backend.load(artifact)
        else:  # verify the ONNX the device will build from; the device's own runtime is timed there
            from dlopt.targets.ort import OrtSession, session_settings

            session = OrtSession(artifact.folder / artifact.check_onnx, session_settings(bench.config.thread_count))
        cand.ran_as = getattr(session, "ran_as", None)
        too_slow = _too_slow(bench, session) if timed else None
        if too_slow:  # check correctness on a few feeds, but do not spend minutes timing a loser
            limit = min(limit or SLOW_CHECK_FEEDS, SLOW_CHECK_FEEDS)
        outputs = bench.outputs(session, f"{backend_name} {precision}", limit)
        latency, energy = bench.latency(session, f"{backend_name} {precision}") if timed else (None, None)
    except Exception as exc:  # a runtime refusing the artefact is a result, not a crash
        cand.status, cand.reason = "failed", f"could not run: {first_line(exc)}"
        return Built(cand)
    if not artifact.loadable_here:
        cand.reason = (f"its {artifact.check_onnx} verified on ONNX Runtime here; built and timed on the "
                       f"{bench.profile.name} device")
    elif not bench.profile.runs_here():
        cand.reason = f"outputs verified on this machine; latency not measured (needs a {bench.profile.name} device)"
    cand.measurement = Measurement(latency, artifact.size_bytes(), bench.accuracy(outputs), energy)
    reference = bench.reference[: len(outputs)]
    cand.fidelity = compare(reference, outputs).to_dict()
    if too_slow:
        cand.status, cand.reason = "rejected", too_slow
    elif limit is None:
        cand.score = bench.scorer.score(outputs).to_dict()
        judge(cand, bench.config.max_accuracy_drop)
    return Built(cand, artifact, outputs, result.model)


# A candidate whose first run takes this many times the original's p50 cannot win: it is
# checked on a few feeds and timed briefly, then reported as too slow (untuned TVM on x86).
SLOW_FACTOR = 20.0
SLOW_CHECK_FEEDS = 4
SLOW_FLOOR_MS = 100.0


def _too_slow(bench: Bench, session) -> str | None:
    import time

    base = (bench.baseline_latency or {}).get("p50_ms")
    if not base:
        return None
    start = time.perf_counter()
    session.run(bench.feeds.feeds[0])
    first_ms = (time.perf_counter() - start) * 1e3
    if first_ms <= max(SLOW_FACTOR * base, SLOW_FLOOR_MS):  # fast enough to evaluate in full anyway
        return None
    return (f"too slow to compete: first run {first_ms:.1f} ms, {first_ms / base:.0f}x the original's "
            f"{base:.2f} ms (checked on {SLOW_CHECK_FEEDS} feeds only)")


def _compile_cached(bench: Bench, backend, model: ir.Model, workdir: Path, precision: str):
    """``backend.compile``, or a verified copy of the same build from the artefact cache."""
    import dataclasses

    from dlopt import __version__
    from dlopt.model_io import initializer_bytes
    from dlopt.targets import Artifact

    key = None
    if bench.cache is not None and initializer_bytes(model) < 2**30:  # hashing huge models costs more
        from dlopt.cache import make_key

        version = getattr(backend, "runtime_version", lambda: "")()
        key = make_key(ir.serde.serialize_model(model).SerializeToString(deterministic=True), backend.name,
                       precision, repr(bench.profile), str(bench.config.thread_count), __version__, version)
        meta = bench.cache.get(key, workdir)
        if meta is not None:
            return Artifact(folder=workdir, **meta)
    artifact = backend.compile(model, bench.profile, workdir, precision=precision, threads=bench.config.thread_count)
    if key is not None:
        meta = {k: v for k, v in dataclasses.asdict(artifact).items() if k != "folder"}
        bench.cache.put(key, workdir, artifact.files, meta)
    return artifact


def judge(cand: Candidate, max_drop: float) -> None:
    """fp32 must reproduce the original (a mismatch is a bug); other precisions must fit the budget.

    Any precision that produces NaN/Inf where the original is finite is rejected outright.
    """
    if cand.fidelity and cand.fidelity.get("non_finite"):
        cand.status = "rejected"
        cand.reason = f"produces {cand.fidelity['non_finite']} where the original is finite"
    elif cand.precision == "fp32":
        limit = FP32_TOLERANCE
        if not cand.fidelity["max_rel_error"] <= limit:
            cand.status = "rejected"
            cand.reason = f"max relative error {cand.fidelity['max_rel_error']:.2e} over the fp32 limit {limit:.0e}"
    elif cand.score is not None and cand.score["drop_pp"] > max_drop:
        cand.status = "rejected"
        cand.reason = (f"{cand.score['metric']} drops {cand.score['drop_pp']:.2f} points, "
                       f"over the budget of {max_drop}")
