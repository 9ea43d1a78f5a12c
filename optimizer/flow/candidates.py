"""Build one (backend, precision) candidate from the float model and judge it.

Every candidate sees the same :class:`dlopt.flow.evaluation.Evaluation` (feeds, reference
outputs, metric, declared timing shape), fixed before the first one is built.  ``build`` takes
four steps, each returning a frozen value: compile (into its own folder, or from the cache) ->
run (its outputs, here or on the device) -> compare (fidelity, size, score) -> judge (its status).
It does not time a candidate: timing happens once, for all finalists together, in the driver's
measure stage (``dlopt.measure.timing``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from dlopt import __version__
from dlopt.core import precisions
from dlopt.core.errors import DloptError, first_line
from dlopt.core.model_io import initializer_bytes
from dlopt.core.pipeline import run_pipeline
from dlopt.core.precisions import Status
from dlopt.core.progress import raise_if_interrupted
from dlopt.flow.cache import code_fingerprint, make_key
from dlopt.flow.evaluation import Evaluation, spot_check, too_slow
from dlopt.measure.budget import Score
from dlopt.measure.evaluate import Fp32Check, compare, fp32_check
from dlopt.measure.fidelity import Fidelity
from dlopt.measure.timing import LocalRunner, Timing
from dlopt.passes import quantize_nncf
from dlopt.passes.fp16 import ConvertFloat16Pass
from dlopt.passes.quantize_dynamic import QuantizeDynamicPass
from dlopt.passes.quantize_nncf import QuantizeNncfPass
from dlopt.passes.quantize_static import QuantizeStaticPass
from dlopt.report.data import Candidate, Measurement
from dlopt.report.sections import mcu as mcu_section
from dlopt.targets import Artifact, backend_status, get_backend
from dlopt.targets.c.figures import McuFigures
from dlopt.targets.ort import OrtSession, session_settings
from dlopt.targets.tvm.tuning_db import TuningApplied


@dataclass(frozen=True)
class Built:
    candidate: Candidate
    artifact: object | None = None
    outputs: list | None = None
    model: ir.Model | None = None  # the ONNX model after its passes (what the backend compiled)
    runner: Callable[[], object] | None = None  # opens a session on it here (timed ones only)


@dataclass(frozen=True)
class Quantiser:
    """Who quantises a precision: the tool (its Python package) and, for ONNX Runtime's, the mode."""

    tool: str
    mode: str | None = None

    @property
    def version(self) -> str:
        return version(self.tool)

    def __str__(self) -> str:
        """The report's label: "nncf 3.4.0", "onnxruntime 1.32.0 static"."""
        return f"{self.tool} {self.version}" + (f" {self.mode}" if self.mode else "")


NNCF, ORT_STATIC, ORT_DYNAMIC = Quantiser("nncf"), Quantiser("onnxruntime", "static"), Quantiser("onnxruntime", "dynamic")


def quantiser(ev: Evaluation, backend_name: str, precision: str) -> Quantiser | None:
    """Who quantises ``precision`` for this backend: NNCF for OpenVINO where it is installed
    (its placement is what OpenVINO's INT8 kernels expect), ONNX Runtime's tools elsewhere."""
    if not precisions.get(precision).quantised:
        return None
    own = get_backend(backend_name).own_quantiser
    if own is not None and precision in get_backend(backend_name).own_precisions:
        return Quantiser(*own)  # ExecuTorch's PT2E flow with XNNPACK's quantizer
    if precision == "int8-dynamic":
        return ORT_DYNAMIC
    if get_backend(backend_name).prefers_nncf and ev.calib_feeds and quantize_nncf.available() is True:
        return NNCF
    return ORT_STATIC


def precision_passes(ev: Evaluation, backend_name: str, precision: str, exclude: tuple[str, ...],
                     only: tuple[str, ...] = ()) -> list:
    """The passes that turn the float model into ``precision`` (table, not if-chains at call sites)."""
    recipe = ev.recipe
    if quantiser(ev, backend_name, precision) == NNCF:
        return [QuantizeNncfPass(calibration=ev.calib_feeds, transformer=bool(recipe and recipe.transformer),
                                 exclude_nodes=exclude)]

    def static(**extra) -> list:
        # OpenVINO's int8 kernels on x86 CPUs without VNNI saturate with 8-bit weights (ONNX Runtime's do too,
        # but dlopt's sessions switch those to exact kernels: targets.ort.CONFIG_ENTRIES): 7 bits there
        reduce_range = get_backend(backend_name).reduce_range_where_saturating and ev.profile.int8_pairs_saturate()
        return [QuantizeStaticPass(ranges=ev.ranges, exclude_nodes=exclude, op_types=recipe.op_types if recipe else None,
                                   symmetric_activations=ev.profile.int8_symmetric, reduce_range=reduce_range,
                                   **extra)]

    table: dict[str, Callable[[], list]] = {
        "fp32": list,
        "original": list,  # the input model as it came
        "fp16": lambda: [ConvertFloat16Pass()],
        "int8": static,
        "mixed": lambda: static(only_nodes=only),
        "int8-dynamic": lambda: [QuantizeDynamicPass()],
        "bf16": list,  # a runtime setting of the backend, not a graph change
    }
    return table[precision]()


def build(
    ev: Evaluation,
    backend_name: str,
    precision: str,
    model: ir.Model,
    workdir: Path,
    *,
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    limit: int | None = None,
) -> Built:
    """Compile, run, compare and judge one candidate: four steps, each returning a frozen value.

    ``limit`` evaluates on the first feeds only (the mixed-precision search's quick
    trials); such a candidate is compared but never scored, judged or published.
    """
    compiled = compile_candidate(ev, backend_name, precision, model, workdir, exclude=exclude, only=only)
    if isinstance(compiled, Built):  # unavailable, unsupported or failed to build: nothing to run
        return compiled
    ran = run_candidate(ev, compiled, limit)
    if isinstance(ran, Built):  # could not run, or cannot run on this machine
        return ran
    return judge_candidate(ev, ran, compare_candidate(ev, ran, limit), limit)


@dataclass(frozen=True)
class Compiled:
    """Step 1: a candidate compiled (or copied from the artefact cache) into its folder."""

    candidate: Candidate  # Status.OK, with its passes, files, quantiser, tuning and MCU figures
    backend: object  # dlopt.targets.Backend
    artifact: object  # dlopt.targets.Artifact
    model: ir.Model  # the ONNX model after its passes (what the backend compiled)


@dataclass(frozen=True)
class Ran:
    """Step 2: a compiled candidate's outputs on the evaluation feeds, here or on the device."""

    compiled: Compiled
    outputs: list
    ran_as: str | None = None
    where: str = ""  # where it was verified (and timed), for the report's reason
    slow_ms: float | None = None  # over the too-slow line: checked on a few feeds only, never timed
    latency: dict | None = None  # measured on the device itself (remote); None: timed by the measure stage
    factory: Callable[[], object] | None = None  # opens a session on it here


def _refused(ev: Evaluation, backend_name: str, precision: str, model: ir.Model):
    """(the candidate as unavailable or unsupported, None) or (None, the backend that can take the model)."""
    status = backend_status(backend_name, ev.profile)
    if status is not True:
        return Built(Candidate(backend_name, precision, Status.UNAVAILABLE, reason=str(status))), None
    backend = get_backend(backend_name)
    refusal = backend.refuses(_section(ev, backend))
    if refusal:
        return Built(Candidate(backend_name, precision, Status.UNSUPPORTED, reason=refusal)), None
    try:
        unsupported = backend.supports(model)
    except DloptError as exc:  # a runtime installed but broken is this backend's problem, not the compile's
        raise_if_interrupted(exc)
        return Built(Candidate(backend_name, precision, Status.UNAVAILABLE, reason=str(exc))), None
    if unsupported:
        return Built(Candidate(backend_name, precision, Status.UNSUPPORTED,
                               reason=f"unsupported ops: {', '.join(unsupported)}")), None
    return None, backend


def compile_candidate(ev: Evaluation, backend_name: str, precision: str, model: ir.Model, workdir: Path, *,
                      exclude: tuple[str, ...] = (), only: tuple[str, ...] = ()) -> Compiled | Built:
    """Step 1, build: the precision's passes, the backend's lowering and its compile (or the cache's copy)."""
    from onnx_ir.passes.common import CheckerPass

    raise_if_interrupted()
    refused, backend = _refused(ev, backend_name, precision, model)
    if refused is not None:
        return refused
    try:
        # A backend that converts a precision itself (OpenVINO compresses weights to fp16) gets the float model.
        own = precision in backend.own_precisions
        who = quantiser(ev, backend_name, precision)
        before = []
        if who == ORT_STATIC and ev.smoothed is not None:  # calibrated on the smoothed model
            model, before = ev.smoothed.model, list(ev.smoothed.records)
        passes = [*([] if own else precision_passes(ev, backend_name, precision, exclude, only)),
                  *backend.lowering_passes(precision), CheckerPass()]
        result = run_pipeline(model.clone(), passes)
        artifact = _compile_cached(ev, backend, result.model, workdir, precision)
    except DloptError as exc:
        # an interrupt inside a native build can come back as a build error (TVM: a RuntimeError)
        raise_if_interrupted(exc)
        return Built(Candidate(backend_name, precision, Status.FAILED, reason=str(exc)))
    base = Candidate(backend_name, precision, Status.OK, passes=[r.to_dict() for r in before + result.records],
                     artifact_files=list(artifact.files), quantiser=None if who is None else str(who),
                     tuning=TuningApplied.from_settings(artifact.settings),
                     mcu=McuFigures.from_settings(artifact.settings))
    return Compiled(base, backend, artifact, result.model)


def run_candidate(ev: Evaluation, compiled: Compiled, limit: int | None) -> Ran | Built:
    """Step 2, run: the outputs on the evaluation feeds, on the device behind ``--remote`` or here."""
    base, artifact = compiled.candidate, compiled.artifact
    remote = ev.config.tvm.remote if not artifact.loadable_here and artifact.check_onnx is None else None
    if remote is not None and limit is None:
        return _run_remote(ev, compiled, remote)
    if not artifact.loadable_here and artifact.check_onnx is None:
        return Built(replace(base, measurement=Measurement(None, artifact.size_bytes()),
                             reason=f"built for {ev.profile.name}; cannot run on this machine, not verified here; "
                                    f"not yet measured on the device: run `dlopt verify` and `dlopt bench` there"),
                     artifact, model=compiled.model)
    factory = _session_factory(ev, compiled)
    slow_ms = None
    try:
        with LocalRunner(base.key, factory) as runner:
            ran_as = runner.ran_as
            # before any evaluation: a candidate that cannot win is checked on a few feeds, never on all
            if ev.profile.runs_here() and artifact.loadable_here:
                slow_ms = too_slow(ev, runner)
            label = f"{base.backend} {base.precision}"
            outputs = spot_check(ev, runner, label, limit) if slow_ms else ev.outputs(runner, label, limit)
    except Exception as exc:  # a runtime refusing the artefact is a result, not a crash
        raise_if_interrupted(exc)
        return Built(replace(base, status=Status.FAILED, reason=f"could not run: {first_line(exc)}"))
    return Ran(compiled, outputs, ran_as, _where(ev, artifact), slow_ms, factory=factory)


def _session_factory(ev: Evaluation, compiled: Compiled) -> Callable[[], object]:
    """Opens the artefact here; one the device builds itself: the ONNX it builds from, on ONNX Runtime."""
    backend, artifact = compiled.backend, compiled.artifact
    if artifact.loadable_here:
        return lambda: backend.load(artifact)

    return lambda: OrtSession(artifact.folder / artifact.check_onnx, session_settings(ev.config.timing.thread_count))


def _run_remote(ev: Evaluation, compiled: Compiled, remote) -> Ran | Built:
    """Verify and time a candidate on the device behind an RPC tracker (TVM libraries only).

    Its latency is the device's own (measured there by TVM's time evaluator, no network in
    it) and is never set against the original's, which ran on this machine.
    """
    base, backend, artifact = compiled.candidate, compiled.backend, compiled.artifact
    try:
        with LocalRunner(base.key, lambda: backend.load_remote(artifact, remote)) as runner:
            outputs = ev.outputs(runner, f"{base.key} on {remote.key}", None)
            per_run = runner.session.time_ms(ev.timing_feed, runs=ev.config.timing.runs, warmup=ev.config.timing.warmup)
            timing = Timing.from_device(per_run, warmup=ev.config.timing.warmup, threads=runner.session.threads)
    except Exception as exc:  # dlopt's one-line errors and the remote runtime's own alike
        raise_if_interrupted(exc)
        return Built(replace(base, status=Status.FAILED, reason=f"could not run on {remote}: {first_line(exc)}"))
    latency = {**timing.to_dict(), "measured_on": str(remote), "device_key": remote.key}
    return Ran(compiled, outputs, where=f"verified and timed on {remote} (device-side timing, {timing.runs} runs)",
               latency=latency)


def compare_candidate(ev: Evaluation, ran: Ran, limit: int | None) -> Candidate:
    """Step 3, compare: fidelity against the original, size, accuracy and (for a full run) the score."""
    base, artifact = ran.compiled.candidate, ran.compiled.artifact
    fidelity = compare(ev.reference[: len(ran.outputs)], ran.outputs)
    # a microcontroller build's size is what it takes in flash, not its source files
    size = (base.mcu.flash_bytes if base.mcu else None) or artifact.size_bytes()
    measurement = Measurement(ran.latency, size, ev.accuracy(ran.outputs))
    score = None if ran.slow_ms or limit is not None else ev.scorer.score(ran.outputs).rounded()
    return replace(base, ran_as=ran.ran_as, fidelity=fidelity, measurement=measurement, score=score,
                   reason=ran.where)


def judge_candidate(ev: Evaluation, ran: Ran, cand: Candidate, limit: int | None) -> Built:
    """Step 4, judge: too slow, the fp32 rule or the accuracy budget; and whether the measure stage times it."""
    compiled = ran.compiled
    if ran.slow_ms:  # rejected, so the measure stage never times it
        reason = (f"too slow to compete: {ran.slow_ms:.1f} ms a run, {ran.slow_ms / ev.original_ms:.0f}x the "
                  f"original's {ev.original_ms:.2f} ms (a candidate slower than the original never ships); checked "
                  f"on {len(ran.outputs)} of {len(ev.data.feeds)} feeds only, not timed")
        return Built(replace(cand, status=Status.REJECTED, reason=reason), compiled.artifact, ran.outputs,
                     compiled.model)
    if limit is not None:
        return Built(cand, compiled.artifact, ran.outputs, compiled.model)
    status, reason = judge(cand.precision, cand.fidelity, cand.score, ev.config.budget.max_accuracy_drop,
                           lossy_passes=ev.config.prune is not None, fp32=fp32_check(ev.reference, ran.outputs))
    cand = replace(cand, status=status, reason=reason or cand.reason)
    # a lower precision the budget refused is timed beside the finalists (never chosen: dlopt.flow.select takes
    # OK ones only), so the report can say how much speed the budget cost
    missed = status is Status.REJECTED and (reason or "").startswith("accuracy budget:") and \
        cand.precision in precisions.REGISTRY and precisions.rank(cand.precision) > precisions.rank("fp32")
    timed = ev.profile.runs_here() and compiled.artifact.loadable_here and (status is Status.OK or missed)
    return Built(cand, compiled.artifact, ran.outputs, compiled.model, ran.factory if timed else None)


def _where(ev: Evaluation, artifact) -> str:
    mcu = McuFigures.from_settings(artifact.settings)
    if mcu is not None:
        return mcu_section.verified(mcu)
    if not artifact.loadable_here:
        return (f"its {artifact.check_onnx} verified on ONNX Runtime here; not yet measured on the "
                f"{ev.profile.name} device: run `dlopt bench` there")
    if not ev.profile.runs_here():
        return f"outputs verified on this machine; not yet measured on the {ev.profile.name} device: run `dlopt bench` there"
    return ""


def _section(ev: Evaluation, backend):
    """The backend's own section of the config (``backend.options_section``), or None: all it is given."""
    return getattr(ev.config, backend.options_section) if backend.options_section else None


def _compile_cached(ev: Evaluation, backend, model: ir.Model, workdir: Path, precision: str):
    """``backend.compile``, or a verified copy of the same build from the artefact cache."""
    import dataclasses

    options = backend.build_options(_section(ev, backend), model, ev.profile, ev.shapes,
                                    threads=ev.config.timing.thread_count, calibration=ev.calib_feeds)
    key = None
    if ev.cache is not None and initializer_bytes(model) < 2**30:  # hashing huge models costs more

        version = backend.runtime_version()
        key = make_key(ir.serde.serialize_model(model).SerializeToString(deterministic=True), backend.name,
                       precision, repr(ev.profile), str(ev.config.timing.thread_count), __version__, code_fingerprint(),
                       version, repr(sorted(ev.shapes.items())), repr(sorted((k, v) for k, v in options.items() if k.startswith("cache:"))))
        meta = ev.cache.get(key, workdir)
        if meta is not None:
            return Artifact(folder=workdir, **meta)
    artifact = backend.compile(model, ev.profile, workdir, precision=precision, threads=ev.config.timing.thread_count,
                               shapes=ev.shapes, **{k: v for k, v in options.items() if not k.startswith("cache:")})
    if key is not None:
        meta = {k: v for k, v in dataclasses.asdict(artifact).items() if k != "folder"}
        ev.cache.put(key, workdir, artifact.files, meta)
    return artifact


def judge(precision: str, fidelity: Fidelity | dict, score: Score | dict | None, max_drop: float, *,
          lossy_passes: bool = False, fp32: Fp32Check | None = None) -> tuple[Status, str]:
    """fp32 must reproduce the original (a mismatch is a bug); other precisions must fit the budget.

    ``fp32`` is the fp32 rule's measure (:func:`dlopt.measure.evaluate.fp32_check`); without it the
    fidelity's ``max_rel_error``, never below that measure, stands in.  ``lossy_passes``: a
    pass meant to change the function ran (``--prune``), so fp32 is judged by the budget like
    the other precisions.  Any precision that produces NaN/Inf where the original is finite is
    rejected outright.  Every refusal starts with the rule that refused.  Report.json's dictionaries are read too.
    """
    fidelity = Fidelity.from_dict(fidelity)
    score = None if score is None else Score.from_dict(score)
    if fidelity.non_finite:
        return Status.REJECTED, f"produces {fidelity.non_finite} where the original is finite"
    if precision == "original" or (precision == "fp32" and not lossy_passes):
        check = fp32 if fp32 is not None else Fp32Check(float(fidelity.max_rel_error), 0)
        if not check.passed:
            return Status.REJECTED, check.refusal()
    elif score is not None and not score.drop_pp <= max_drop:
        return Status.REJECTED, (f"accuracy budget: {score.metric} drops {score.drop_pp:.2f} points, over the "
                                 f"budget of {max_drop}")
    return Status.OK, ""
