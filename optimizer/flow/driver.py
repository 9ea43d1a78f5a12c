"""compile(config) -> Report: the one-way flow from model to published artefacts.

Each stage takes frozen values and returns a new one:

    prepare  -> Job          load + check the model, resolve the target and the output folder,
                             open the evaluation data, fix the declared timing shapes
    evaluate -> Evaluation   the original's reference outputs, the metric, calibration
    plan     -> [Planned]    which backend x precision candidates to build
    build    -> Builds       compile, verify and score each (mixed-precision search if int8 misses)
    measure  -> Measured     time the finalists and the original together, interleaved
    select   -> Verdict      dlopt.flow.select: the choice policy
    write    -> Report       write artefacts, manifest and reports atomically (dlopt.flow.write)
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from dlopt.calibration import CalibrationDataset, open_dataset
from dlopt.calibration.memory import PeakRSS
from dlopt.core import precisions
from dlopt.core.artifacts import (check_output_dir, lock_path, output_lock, parents_made, remove_stale_staging,
                             resolve_output, staging_dir)
from dlopt.core.config import CompileConfig
from dlopt.core.errors import AccuracyBudgetExceeded, CompileError, ConfigError, ModelError
from dlopt.core.graph_facts import GENERATED_CONSTANT_LIMIT, largest_generated_constant
from dlopt.core.inputs import RandomInputs, constant_arrays
from dlopt.core.layout import batch_axes, samples_in
from dlopt.core.model_io import (check_proto, decode_model_bytes, load_ir, read_model_proto, sha256_file,
                            with_named_dims)
from dlopt.core.pipeline import PipelineResult, run_pipeline
from dlopt.core.precisions import Status
from dlopt.core.profiles import TargetProfile, resolve_target
from dlopt.core.progress import raise_if_interrupted, removed_on_hard_exit
from dlopt.core.shapes import declared_shapes, feed_at
from dlopt.core.specs import InputSpec, input_specs, output_specs
from dlopt.flow import recipe, select
from dlopt.flow.cache import ArtifactCache
from dlopt.flow.candidates import NNCF, ORT_DYNAMIC, ORT_STATIC, Built, build, quantiser
from dlopt.flow.evaluation import EvalData, Evaluation, owned
from dlopt.flow.mixed import search
from dlopt.flow.ranges import compute_ranges
from dlopt.flow.recipe import weights_in
from dlopt.flow.write import assemble, write_output
from dlopt.measure.budget import Scorer, find_mask_input
from dlopt.measure.energy import EnergyAccount
from dlopt.measure.evaluate import BoundedOrtSession, RunTimedOut
from dlopt.measure.timing import LocalRunner, Timing, quick_ms, time_interleaved
from dlopt.passes import generic_passes
from dlopt.passes.smooth_quant import SmoothQuantPass
from dlopt.report.data import Candidate, Report
from dlopt.targets import REFERENCE_BACKEND, backend_status, get_backend, runs_over_rpc
from dlopt.targets.ort import OrtSession, session_settings
from dlopt.targets.tvm.rpc import require

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """What ``prepare`` fixed before any heavy work: everything later stages read, never change."""

    config: CompileConfig
    profile: TargetProfile
    proto: onnx.ModelProto
    model: ir.Model
    info: dict  # path, sha256, size_bytes of the input model
    out: Path  # resolved output folder
    specs: tuple[InputSpec, ...]
    data: EvalData
    shapes: dict[str, tuple[int, ...]]
    timing_feed: dict[str, np.ndarray]
    random: RandomInputs
    calib_data: object | None  # an opened CalibrationDataset, or None


@dataclass(frozen=True)
class Builds:
    built: tuple[Built, ...]
    search: dict | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Measured:
    """Timings at the declared shape, the original's included, all from one interleaved run."""

    original: Timing | None
    original_energy: dict | None
    timings: dict[str, Timing]
    energy: dict[str, dict]


# -- prepare ----------------------------------------------------------------------------------------

def _load(config: CompileConfig) -> tuple[onnx.ModelProto, ir.Model, dict]:
    model = config.model
    if isinstance(model, (bytes, bytearray, memoryview)):
        model = decode_model_bytes(model)
    elif not isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        raise ModelError(f"model must be an .onnx path, serialised ONNX bytes or an onnx.ModelProto, "
                         f"got {type(model).__name__}")
    if isinstance(model, onnx.ModelProto):
        model = with_named_dims(model)  # Paddle's -1 sizes become symbolic dims
        check_proto(model)
        data = model.SerializeToString()
        info = {"path": None, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
        return model, ir.serde.deserialize_model(model), info
    path = Path(model)
    proto = read_model_proto(path)
    info = {"path": str(path), "sha256": sha256_file(path), "size_bytes": path.stat().st_size}
    return proto, load_ir(path), info


# Random feeds for a classifier: one disagreement must cost at most this share of the budget.
RANDOM_DISAGREEMENT_SHARE = 0.1
RANDOM_SAMPLES_MAX = 2000
RANDOM_BATCH = 32


def random_sample_count(config: CompileConfig, proto: onnx.ModelProto) -> int:
    """How many random samples a verdict needs: 20, or for classifier outputs [N, C] (scored by
    top-1 agreement, 100/N points a disagreement) enough that one costs a tenth of the budget."""
    if config.data.samples is not None:
        return config.data.samples
    first = output_specs(proto)[0] if proto.graph.output else None
    classifier = first is not None and len(first.shape) == 2 and first.dtype.kind == "f" and first.shape[1] != 1
    if not classifier or config.budget.metric not in (None, "top1"):
        return config.data.random_samples
    budget = config.budget.max_accuracy_drop * RANDOM_DISAGREEMENT_SHARE
    return int(min(RANDOM_SAMPLES_MAX, max(config.data.random_samples, -(-100 // budget) if budget > 0 else 10**9)))


def _random_feeds(config: CompileConfig, specs, random: RandomInputs, shapes, count: int) -> list:
    """``count`` random samples, up to 32 to a feed where every input's batch axis is symbolic."""
    axes = batch_axes(specs)
    batched = all(axes[s.name] is not None and not (isinstance(s.shape[axes[s.name]], int) and s.shape[axes[s.name]] > 0)
                  for s in specs) and specs
    per_feed = min(RANDOM_BATCH, count) if batched and count > config.data.random_samples else 1
    if per_feed == 1:
        return random.feeds(shapes, count, config.data.seed)
    wide = {s.name: tuple(per_feed if a == axes[s.name] else d for a, d in enumerate(shapes[s.name])) for s in specs}
    feeds = random.feeds(wide, -(-count // per_feed), config.data.seed)
    rest = count - per_feed * (len(feeds) - 1)
    if rest < per_feed:  # the last feed holds only what is left
        feeds[-1] = {s.name: np.take(feeds[-1][s.name], np.arange(rest), axis=axes[s.name]) for s in specs}
    return feeds


def _eval_data(config: CompileConfig, specs, random: RandomInputs, shapes, constants, count: int = 0) -> EvalData:
    if config.data.inputs is None:
        feeds = _random_feeds(config, specs, random, shapes, count or config.data.random_samples)
        return EvalData(tuple(feeds), (), f"random (seed {config.data.seed})", batch_axes(specs))

    data = open_dataset(config.data.inputs, specs, batch_size=32, limit=config.data.eval_limit, constants=constants)
    feeds, labels = [], []
    for feed, label in data.iter_with_labels():
        feeds.append(feed)
        if label is not None:
            labels.append(label)
    if labels and len(labels) != len(feeds):
        labels = []
    source = str(config.data.inputs) if isinstance(config.data.inputs, (str, Path)) else type(config.data.inputs).__name__
    return EvalData(tuple(feeds), tuple(labels), source, batch_axes(specs))


def prepare(config: CompileConfig) -> Job:
    """Everything that can be checked before the output lock and the heavy work."""
    profile = resolve_target(config.target, config.targets_file)
    proto, model, info = _load(config)
    name = Path(info["path"]).stem if info["path"] else (proto.graph.name or "model")
    out = resolve_output(config.output_dir(name))
    inputs = tuple(Path(p) for p in (info["path"], config.data.inputs, config.data.calib) if isinstance(p, (str, Path)))
    check_output_dir(out, inputs=inputs)
    specs = tuple(input_specs(proto))
    constants = constant_arrays(specs, config.data.constants, config.timing.shapes)
    random = RandomInputs.for_model(proto, specs, constants=constants)
    calib_data = None
    if config.data.calib is not None:  # open it now: names, dtypes and shapes are checked before any work

        calib_data = open_dataset(config.data.calib, specs, limit=config.data.calib_samples, preprocess=config.data.calib_preprocess,
                                  constants=constants)
    if config.data.inputs is not None:
        data = _eval_data(config, specs, random, None, constants)
        first = data.feeds[0] if data.feeds else None
        shapes = declared_shapes(specs, batch=config.timing.batch, shapes=config.timing.shapes,
                                 data_shapes={n: np.shape(a) for n, a in (first or {}).items()})
    else:
        # symbolic dims the calibration data fixes (a re-readable source: one batch is read here)
        seen = _first_feed(calib_data) if calib_data is not None else None
        shapes = declared_shapes(specs, batch=config.timing.batch, shapes=config.timing.shapes,
                                 data_shapes={n: np.shape(a) for n, a in (seen or {}).items()})
        data, first = _eval_data(config, specs, random, shapes, constants, random_sample_count(config, proto)), None
    rng = np.random.default_rng(config.data.seed + 2)
    timing_feed = feed_at(shapes, first, lambda s: random.feed(s, rng), axes=batch_axes(specs))
    return Job(config, profile, proto, model, info, out, specs, data, shapes, timing_feed, random, calib_data)


def _first_feed(dataset) -> dict | None:
    """The first batch of a dataset that can be read twice (files, folders, lists), else None."""
    if getattr(dataset, "_one_pass", False):
        return None
    return next(iter(dataset), None)


# -- evaluate ---------------------------------------------------------------------------------------

def _reference_runner(job: Job, *, bounded: bool = False) -> LocalRunner:
    """The original on ONNX Runtime; ``bounded``: each run stopped past ``reference_timeout_s`` (for the
    reference outputs; the timed runs go unwrapped, and a model that made its reference outputs in time
    runs as long at the timing shape)."""
    source = job.info["path"] or job.proto.SerializeToString()
    settings = session_settings(job.config.timing.thread_count, job.model)
    if bounded:
        return LocalRunner("original", lambda: BoundedOrtSession(OrtSession(source, settings),
                                                                 job.config.timing.reference_timeout_s))
    return LocalRunner("original", lambda: OrtSession(source, settings))


def evaluate(job: Job, generic: PipelineResult, pairs, staged: Path, notes: list[str]) -> Evaluation:
    """Run the original on every feed (the reference), fix the metric, calibrate when int8 is planned."""
    config = job.config
    where = "the timing shape"
    try:
        with _reference_runner(job, bounded=True) as runner:
            reference = []
            for i, feed in enumerate(job.data.feeds):
                where = f"feed {i + 1} of {len(job.data.feeds)}"
                reference.append(owned(runner.run(feed)))
                _progress(config, "original: outputs", i + 1, len(job.data.feeds))
            where = "the timing shape"
            runner.run(job.timing_feed)
            original_ms = quick_ms(runner, job.timing_feed)
    except RunTimedOut as exc:
        raise ModelError(f"one run of the original model on ONNX Runtime ({where}) passed the "
                         f"{config.timing.reference_timeout_s:g} s limit and was stopped (a Loop or Scan with a huge trip "
                         f"count never ends); if the model is really this slow, raise --reference-timeout SECONDS "
                         f"(reference_timeout_s)") from exc
    except Exception as exc:  # the user's model must run to be compared with
        raise_if_interrupted(exc)
        random = config.data.inputs is None
        fixed = [s.name for s in job.specs if s.dtype.kind in "iub" and len(s.shape) <= 1
                 and s.name not in (config.data.constants or {})] if random else []
        hint = "; pass representative data with --eval" + (
            f" or the value of {', '.join(fixed)} with --const NAME=VALUE (random integers may choose a branch "
            f"the model refuses)" if fixed else "") if random else ""
        said = " ".join(str(exc).split())  # ORT puts the useful part ("index: 0 Got: 32 Expected: 2") on a new line
        said = said if len(said) <= 400 else said[:397] + "..."
        raise ModelError(f"ONNX Runtime cannot run the original model on the {'random' if random else 'evaluation'} "
                         f"inputs: {said}{hint}") from exc
    cache = None
    if config.output.cache:
        cache = ArtifactCache()
    mask = find_mask_input(job.specs, job.data.feeds, config.data.mask_input)
    scorer = Scorer(reference, list(job.data.labels), config.budget.metric, mask_name=mask,
                    masks=[feed[mask] for feed in job.data.feeds] if mask else None)
    ev = Evaluation(config, job.profile, job.data, tuple(reference), scorer, job.shapes, job.timing_feed,
                    original_ms, cache=cache)
    if any(p is not None and precisions.get(p).calibrated for _, p in pairs):
        ev = replace(ev, recipe=recipe.choose(generic.model, config.data.calib_method))
        ev = _calibrate(job, ev, generic.model, pairs, staged / "calibration.json", notes)
    return ev


def _calibrate(job: Job, ev: Evaluation, model: ir.Model, pairs, ranges: Path, notes: list[str]) -> Evaluation:
    """Ranges for dlopt's static quantiser (on the smoothed model for transformers); the batches
    themselves kept only when NNCF or SmoothQuant read them again."""
    config = job.config
    data, source = _calibration_data(job, ev, notes)
    probe = replace(ev, calib_feeds=({},))  # quantiser() asks only whether feeds exist
    quantisers = {quantiser(probe, b, p) for b, p in pairs if p is not None and precisions.get(p).calibrated}
    smooth = ev.recipe.smooth_alpha is not None and ORT_STATIC in quantisers
    reads_feeds = quantisers - {ORT_STATIC, ORT_DYNAMIC, None}  # NNCF, or a backend's own quantiser (ExecuTorch's PT2E)
    if reads_feeds or smooth:
        import time

        start = time.perf_counter()
        with PeakRSS() as rss:
            if isinstance(data, CalibrationDataset) and not getattr(data, "_one_pass", False):
                counts = [samples_in(f) for f in data]  # a streamed pass: NNCF and SmoothQuant read it again
            else:  # evaluation or random feeds (in memory already), or a one-pass iterator: kept
                data = tuple(data)
                counts = [samples_in(f) for f in data if f]
        read = {"samples": sum(counts), "batches": len(counts),
                "seconds": round(time.perf_counter() - start, 3), "peak_rss_mb": round(rss.peak_bytes / 2**20, 1),
                "rss_increase_mb": round(rss.delta_bytes / 2**20, 1)}
        ev = replace(ev, calib_feeds=data)
    if smooth:
        _progress(config, "SmoothQuant", 0, 1)
        ev = replace(ev, smoothed=run_pipeline(model.clone(), [SmoothQuantPass(calibration=data,
                                                                               alpha=ev.recipe.smooth_alpha)]))
        _progress(config, "SmoothQuant", 1, 1)
        model = ev.smoothed.model
    if ORT_STATIC not in quantisers:
        # NNCF gathers its statistics inside its build: these figures are for reading the data
        who = "nncf" if NNCF in quantisers else ", ".join(sorted(q.tool for q in reads_feeds))
        return replace(ev, calibration={**read, "source": source, "recipe": ev.recipe.to_dict(),
                                        "method": f"{who} (its own statistics, gathered in the build)"})
    known = (sum(samples_in(f) for f in data if f) if isinstance(data, (tuple, list))
             else getattr(data, "samples", None))  # a dataset knows only after a first pass
    total = min(config.data.calib_samples, known) if known else config.data.calib_samples
    method = ev.recipe.calib_method
    # only the tensors around the ops the recipe quantises: a percentile histogram of every
    # tensor of a transformer costs minutes
    op_types = list(ev.recipe.op_types) if ev.recipe.op_types else None

    def calibrate(method: str):
        return compute_ranges(model, data, ranges, method=method, op_types=op_types,
                              progress=lambda n: _progress(config, "calibration", min(n, total), total))

    try:
        stats = calibrate(method)
    except CompileError as exc:
        raise_if_interrupted(exc)
        if method == "minmax" or config.data.calib_method != "auto":
            raise
        notes.append(f"{method} calibration failed ({exc}); min-max ranges were used instead")
        stats = calibrate("minmax")
    _progress(config, "calibration", total, total)
    return replace(ev, ranges=ranges, calibration={**stats.to_dict(), "source": source,
                                                   "recipe": ev.recipe.to_dict()})


def _calibration_data(job: Job, ev: Evaluation, notes: list[str]):
    config = job.config
    if job.calib_data is not None:
        data = job.calib_data
        source = str(config.data.calib) if isinstance(config.data.calib, (str, Path)) else type(config.data.calib).__name__
    elif config.data.inputs is not None:
        data, source = _first_samples(ev.data.feeds, config.data.calib_samples), f"the evaluation data ({ev.data.source})"
        notes.append("INT8 was calibrated on the evaluation data (no --calib): accuracy may look better than "
                     "on unseen data")
    else:
        data = job.random.feeds(job.shapes, config.data.calib_samples, config.data.seed + 1)
        source = "random inputs"
        notes.append("INT8 was calibrated on random inputs (no --calib): pass representative data for "
                     "meaningful ranges")
    return data, source


def _first_samples(feeds, limit: int) -> tuple:
    """Whole feeds until ``limit`` samples (the last feed cut when its batch axis is the first)."""
    kept, count = [], 0
    for feed in feeds:
        if count >= limit:
            break
        n = samples_in(feed)
        if count + n > limit and all(np.ndim(a) >= 1 and len(a) == n for a in feed.values()):
            feed = {k: v[: limit - count] for k, v in feed.items()}
            n = limit - count
        kept.append(feed)
        count += n
    return tuple(kept)


def _progress(config: CompileConfig, stage: str, done: int, total: int) -> None:
    """Report a stage's progress; every report is also where an interrupt a build swallowed ends the compile."""
    raise_if_interrupted()
    if config.progress is not None:
        config.progress(stage, done, total)


# -- plan and build ---------------------------------------------------------------------------------

def plan_precisions(config: CompileConfig, profile: TargetProfile, model: ir.Model) -> list[str]:
    if config.precision != "auto":
        return [config.precision]
    chosen = [p for p in profile.precisions if p in precisions.REGISTRY and precisions.get(p).auto]
    if largest_generated_constant(model) > GENERATED_CONSTANT_LIMIT:
        # calibration would copy that constant once per sample (68 s for 576 MB x 256 samples), and
        # fp16 adds a Cast that copies it on every run: only fp32 is worth its memory
        chosen = [p for p in chosen if p == "fp32"]
    if "int8" in profile.precisions and weights_in(model, ("MatMul", "Gemm")) > weights_in(model, ("Conv", "ConvTranspose")):
        chosen.append("int8-dynamic")  # transformer/MLP-shaped: dynamic quantisation may win
    return chosen


def plan(config: CompileConfig, profile: TargetProfile, model: ir.Model) -> list[tuple[str, str | None]]:
    """(backend, precision) pairs to build, in the target's order; (backend, None) for an unusable backend."""
    wanted = plan_precisions(config, profile, model)
    transformer = config.precision == "auto" and "int8" in wanted and recipe.choose(model).transformer
    pairs: list[tuple[str, str | None]] = []
    for backend in profile.backends:
        if backend_status(backend) is not True:
            pairs.append((backend, None))
            continue
        offered = get_backend(backend).precisions(profile)
        order = [p for p in wanted if p in offered]
        if transformer and not get_backend(backend).static_int8_for_transformers and {"int8", "int8-dynamic"} <= set(order):
            # dynamic before static: static int8 is built only if dynamic misses the budget (build_all)
            order.remove("int8-dynamic")
            order.insert(order.index("int8"), "int8-dynamic")
        # a precision only a backend offers (OpenVINO's bf16) joins under auto
        extras = [p for p in offered if p in precisions.REGISTRY and not precisions.get(p).user_choice
                  and not precisions.get(p).calibrated] if config.precision == "auto" else []
        pairs += [(backend, p) for p in [*order, *extras]]
    return pairs


def build_all(ev: Evaluation, pairs, model: ir.Model, staged: Path) -> Builds:
    built: list[Built] = []
    notes: list[str] = []
    for backend, precision in pairs:
        if precision is None:
            built.append(Built(Candidate(backend, "-", Status.UNAVAILABLE, reason=str(backend_status(backend)))))
            continue
        if _dynamic_is_enough(ev, backend, precision, built):
            notes.append(f"{backend}: no static int8 for this transformer: int8-dynamic met the budget, and "
                         f"{backend} runs transformers' dynamic INT8 MatMuls faster than static QDQ ones")
            continue
        _progress(ev.config, f"build {backend}/{precision}", 0, 1)
        one = build(ev, backend, precision, model, staged / "candidates" / f"{backend}-{precision}")
        _progress(ev.config, f"build {backend}/{precision}", 1, 1)
        built.append(one)
    mixed, search_info, search_notes = _search_mixed(ev, built, model, staged)
    return Builds(tuple(built + mixed), search_info, tuple(notes + search_notes))


def _dynamic_is_enough(ev: Evaluation, backend: str, precision: str, built: list[Built]) -> bool:
    """A transformer's static int8 is skipped where the backend prefers dynamic and dynamic fits."""
    if precision != "int8" or ev.config.precision != "auto" or not (ev.recipe and ev.recipe.transformer):
        return False
    if get_backend(backend).static_int8_for_transformers:
        return False
    return any(b.candidate.backend == backend and b.candidate.precision == "int8-dynamic"
               and b.candidate.status is Status.OK for b in built)


def _search_mixed(ev: Evaluation, built: list[Built], model: ir.Model, staged: Path):
    """Where int8 missed the budget, keep its most sensitive nodes in float (dlopt.flow.mixed).

    The backends share one ``search_time``: the one whose int8 came closest searches first.
    """
    import time

    missed = [b for b in built if b.candidate.precision == "int8" and b.candidate.status is Status.REJECTED
              and b.candidate.score is not None and b.model is not None
              and "mixed" in get_backend(b.candidate.backend).precisions(ev.profile)]  # ExecuTorch quantises itself
    missed.sort(key=lambda b: b.candidate.score.drop_pp)
    kept = [b.candidate.key for b in built if b.candidate.precision == "int8" and b.candidate.status is Status.OK]
    if missed and kept and ev.config.precision == "auto":
        # a mixed model keeps part of int8's graph in float: it cannot beat an int8 that met the budget by
        # enough to pay for its search (all-MiniLM: 85 s of ORT search beside an OpenVINO int8 3x faster)
        return [], None, [f"no mixed-precision search for {', '.join(b.candidate.backend for b in missed)}: "
                          f"{', '.join(kept)} met the budget in full INT8"]
    deadline = time.monotonic() + ev.config.budget.search_time
    found, infos, notes = [], [], []
    for one in missed:
        backend = one.candidate.backend
        left = deadline - time.monotonic()
        if left <= 1:
            notes.append(f"no time left to search mixed precision for {backend} (--search-time "
                         f"{ev.config.budget.search_time:g} s shared by all backends)")
            continue
        timed = replace(ev, config=ev.config.with_options(search_time=left))
        # the float model its int8 was quantised from: node names and tensors match it
        start = ev.smoothed.model if ev.smoothed is not None and quantiser(ev, backend, "int8") == ORT_STATIC \
            else model
        mixed, info = search(timed, backend, start, one.model, staged / "candidates" / f"{backend}-mixed")
        info["backend"] = backend
        infos.append(info)
        if mixed is not None:
            found.append(mixed)
        if not info["complete"]:
            notes.append(f"mixed-precision search for {backend} stopped at the {ev.config.budget.search_time:g} s limit; "
                         f"the best model found by then is reported")
    # the first search at the top (the report's schema); the others' beside it
    search_info = ({**infos[0], **({"other_backends": infos[1:]} if infos[1:] else {})} if infos else None)
    return found, search_info, notes


# -- measure and select -----------------------------------------------------------------------------

def measure(job: Job, ev: Evaluation, builds: Builds) -> Measured:
    """Time every verified candidate that runs here together with the original, interleaved, each
    through several sessions opened in turn (timing.SESSIONS): one session's speed is not another's."""
    finalists = [b for b in builds.built if b.runner is not None]
    if not job.profile.runs_here():
        return Measured(None, None, {}, {})
    runners = {"original": _reference_runner(job)}
    runners.update({b.candidate.key: LocalRunner(b.candidate.key, b.runner) for b in finalists})
    host = resolve_target("cpu")
    meters = {key: EnergyAccount(host if key == "original" else job.profile, measure_here=True) for key in runners}
    opened = []
    try:
        for runner in runners.values():
            opened.append(runner.open())
        config = job.config
        timings = time_interleaved(runners, job.timing_feed, runs=config.timing.runs,
                                   warmup=config.timing.warmup, threads=config.timing.thread_count, meters=meters,
                                   max_seconds=config.timing.timing_budget_s,
                                   progress=lambda d, t: _progress(config, "timing (interleaved)", d, t))
    finally:
        for runner in opened:
            runner.close()
    energy = {k: meters[k].result(t.runs) for k, t in timings.items()}
    original = timings.pop("original")
    return Measured(original, energy.pop("original"), timings, energy)


def _with_original(job: Job, ev: Evaluation, builds: Builds, measured: Measured, staged: Path):
    """Add the input model itself as an ORT artefact (timed already: it is the original)."""
    original = build(replace(ev, cache=None), REFERENCE_BACKEND, "original", job.model,
                     staged / "candidates" / f"{REFERENCE_BACKEND}-original")
    if original.candidate.status is not Status.OK:
        raise CompileError(f"could not ship the original model: {original.candidate.reason}")
    return (replace(builds, built=(*builds.built, original)),
            replace(measured, timings={**measured.timings, select.ORIGINAL: measured.original},
                    energy={**measured.energy, select.ORIGINAL: measured.original_energy}))


def _original_can_ship(job: Job, measured: Measured) -> bool:
    """Under ``--precision auto`` on a target that runs here with ONNX Runtime, without pruning (which
    asked for a smaller model), the unchanged input model is the floor every compile can ship."""
    config = job.config
    return (config.precision == "auto" and config.prune is None and measured.original is not None
            and REFERENCE_BACKEND in job.profile.backends and job.profile.runs_here())


def _entries(builds: Builds, measured: Measured) -> list[select.Entry]:
    return [select.Entry(b.candidate.key, b.candidate.backend, b.candidate.precision, b.candidate.status,
                         measured.timings.get(b.candidate.key)) for b in builds.built]


# -- the flow ---------------------------------------------------------------------------------------

def compile(config: CompileConfig) -> Report:  # noqa: A001 - the verb users know
    job = prepare(config)
    if config.tvm.remote is not None:  # a wrong tracker or key fails now, not after the builds
        job = _behind_tracker(job)
    # the lock file's name is artifacts.output_lock's
    lock = lock_path(job.out)
    with parents_made(job.out), output_lock(job.out, wait=config.output.wait), removed_on_hard_exit(lock):
        inputs = tuple(Path(p) for p in (job.info["path"], config.data.inputs, config.data.calib) if isinstance(p, (str, Path)))
        check_output_dir(job.out, inputs=inputs)  # again: the compile that held the lock may have written it
        notes = [f"removed {entry}, left by an earlier compile that was killed"
                 for entry in remove_stale_staging(job.out)]
        return _run(job, notes)


@dataclass(frozen=True)
class _MeasuredRemotely(TargetProfile):
    """A target given with ``--rpc-tracker``: the device behind the key, never this machine, even
    for an x86 target this machine could run (an x86 box in the farm), so its TVM candidates are
    verified and timed there and nothing is timed here, as for a board."""

    def runs_here(self) -> bool:
        return False


def _behind_tracker(job: Job) -> Job:
    """The job with its target moved behind the RPC tracker, once the tracker has the key's servers."""
    profile, remote = job.profile, job.config.tvm.remote
    if not any(runs_over_rpc(name) for name in profile.backends):
        raise ConfigError(f"--rpc-tracker measures TVM libraries on the device, and target {profile.name} builds "
                          f"none (its backends: {', '.join(profile.backends)}); drop --rpc-tracker/--rpc-key or "
                          f"give a target with tvm among its backends")
    require(remote)
    if profile.runs_here():
        profile = _MeasuredRemotely(**{f.name: getattr(profile, f.name) for f in fields(profile)})
    return replace(job, profile=profile)


def _run(job: Job, notes: list[str]) -> Report:
    generic = run_pipeline(job.model, generic_passes(prune=job.config.prune, model=job.model))
    raise_if_interrupted()
    generated = largest_generated_constant(generic.model)
    if generated > GENERATED_CONSTANT_LIMIT and job.config.precision == "auto":
        notes.append(f"only fp32 was tried: the model generates a {generated / 1e6:.0f} MB constant at run time, "
                     f"which calibration would copy for every sample and fp16 on every run")
    with staging_dir(job.out) as staged, removed_on_hard_exit(staged):
        pairs = plan(job.config, job.profile, generic.model)
        ev = evaluate(job, generic, pairs, staged, notes)
        builds = build_all(ev, pairs, generic.model, staged)
        measured = measure(job, ev, builds)
        verdict = select.choose(_entries(builds, measured), measured.original, job.profile.backends,
                                auto=job.config.precision == "auto",
                                lossy=f"--prune {job.config.prune:g}" if job.config.prune else None)
        verdict, floor = select.original_floor(verdict, _original_can_ship(job, measured))
        notes.extend(floor)
        if verdict.chosen == select.ORIGINAL:
            builds, measured = _with_original(job, ev, builds, measured, staged)
        candidates = [b.candidate for b in builds.built]
        notes.extend(select.missed_budget_notes(candidates, verdict.chosen, measured.timings,
                                                ev.scorer.name, job.config.budget.max_accuracy_drop))
        fallback = select.closest_over_budget(verdict, candidates, {b.candidate.key for b in builds.built
                                                                    if b.artifact is not None}, job.profile.name)
        verdict = fallback.verdict
        notes.extend(fallback.notes)
        report = assemble(job, ev, generic, builds, measured, verdict, notes + list(builds.notes),
                          over_budget=fallback.closest is not None)
        raise_if_interrupted()  # the last point where a swallowed interrupt can still stop the publish
        write_output(job, ev, builds, verdict, report, staged)
    if fallback.closest is not None:
        error = AccuracyBudgetExceeded(select.over_budget_message(ev.scorer.name, job.config.budget.max_accuracy_drop,
                                                                  fallback.scored, job.out))
        error.report = report
        raise error
    return report

