"""``dlopt.compress``: prune -> distil -> export -> compile, with teacher and students side by side.

The output folder holds::

    compress.md / compress.json   the side-by-side table and everything behind it
    models/teacher.onnx, models/pruned.onnx, models/student.onnx   (symbolic batch)
    student/                       the distilled student saved whole (dlopt.compression.pruning.save_module)
    compiled/                      ``dlopt.compile`` of the student for the target
    compiled-teacher/              the same for the teacher (the fair comparison)
    manifest.json

Latency: the three ONNX models (ONNX Runtime, fp32, the target's thread count) and the
teacher's and student's compiled artefacts are timed in one interleaved run at batch 1
(or ``batch``), so their ratios are measured, not derived from multiply-adds.  Accuracy:
top-1 of each torch module on ``eval``, and of the compiled artefact as its compile
report measured it.  Everything is written beside the output folder and renamed into
place at the end; an existing folder is replaced only when dlopt wrote it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from dlopt.compression.distillation import accuracy, distill, split_batch
from dlopt.compression.exporter import export, forward_names
from dlopt.compression.pruning import _as_tuple, prune, save_module
from dlopt.core.artifacts import (MANIFEST, check_output_dir, move_into_place, output_lock, parents_made, staging_dir,
                                  write_file)
from dlopt.core.config import default_threads
from dlopt.core.optional import torch_threads
from dlopt.core.errors import ConfigError
from dlopt.core.progress import TerminalProgress
from dlopt.measure.timing import LocalRunner, time_interleaved
from dlopt.targets.ort import OrtSession, session_settings

logger = logging.getLogger(__name__)

ROWS = ("teacher", "pruned", "student")
COMPILED = {"teacher": "compiled-teacher", "student": "compiled"}


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    params: int | None
    macs: int | None
    size_bytes: int
    latency: dict | None  # dlopt.measure.timing.Timing.to_dict()
    accuracy: float | None


@dataclass
class CompressResult:
    """The distilled student (a torch module), the table's rows and the reports behind them."""

    student: Any
    rows: list[Row]
    prune: Any  # dlopt.compression.pruning.PruneReport
    history: list  # dlopt.compression.distillation.DistillEvent per epoch
    compile_reports: dict  # "teacher"/"student" -> dlopt.Report of its compile
    out: Path
    timing: dict = field(default_factory=dict)  # batch, threads, runs

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)

    def speedup(self, name: str) -> float | None:
        """Against the teacher as the row was run: ONNX rows vs its ONNX, compiled rows vs it compiled."""
        over = "teacher compiled" if name.endswith(" compiled") else "teacher"
        a, b = self.row(over).latency, self.row(name).latency
        return round(a["p50_ms"] / b["p50_ms"], 3) if a and b else None

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) | {"speedup_over_teacher": self.speedup(r.name)} for r in self.rows],
            "timing": self.timing,
            "prune": self.prune.to_dict(),
            "distill": [e.to_dict() for e in self.history],
            "compiled": {name: {"chosen": r.chosen, "summary": r.summary} for name, r in self.compile_reports.items()},
        }

    def table(self) -> str:
        from tabulate import tabulate

        def ms(row: Row) -> str:
            t = row.latency
            return "-" if not t else f"{t['p50_ms']:.3f} ({t['ci_low_ms']:.3f}-{t['ci_high_ms']:.3f})"

        rows = [(r.name, r.what, "-" if r.params is None else f"{r.params:,}",
                 "-" if r.macs is None else f"{r.macs / 1e6:.2f} M", f"{r.size_bytes / 1024:.0f} KiB", ms(r),
                 "-" if self.speedup(r.name) is None else f"{self.speedup(r.name):.2f}x",
                 "-" if r.accuracy is None else f"{100 * r.accuracy:.2f}%") for r in self.rows]
        t = self.timing
        return (tabulate(rows, headers=("model", "what", "parameters", "multiply-adds", "size",
                                        "latency p50 ms (95% CI)", "vs teacher", "top-1"), tablefmt="github")
                + f"\n\nLatency: batch {t['batch']}, {t['threads']} thread(s), {t['runs']} runs each, interleaved "
                  f"in one process; ONNX rows on ONNX Runtime {t['ort']} fp32 as exported, compiled rows as "
                  f"dlopt.compile chose for the target.  'vs teacher': ONNX rows against the teacher's ONNX, "
                  f"compiled rows against the teacher compiled the same way.  Top-1 on {t['eval_samples']} "
                  f"evaluation samples.\n")


def _eval_arrays(eval_data) -> tuple[list[np.ndarray], np.ndarray]:
    """(inputs, labels) as numpy from (x, y) arrays/tensors or an iterable of (x..., y) batches."""
    def numpy(t):
        return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)

    if isinstance(eval_data, (tuple, list)) and len(eval_data) >= 2 and all(hasattr(a, "shape") for a in eval_data):
        *xs, y = eval_data
        return [numpy(x) for x in xs], numpy(y)
    parts: list[list[np.ndarray]] = []
    labels = []
    for batch in eval_data:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ConfigError("eval must be (inputs..., labels) arrays or yield (inputs..., labels) batches")
        *xs, y = batch
        parts.append([numpy(x) for x in xs])
        labels.append(numpy(y))
    if not parts:
        raise ConfigError("eval yielded no batches")
    return [np.concatenate(p) for p in zip(*parts)], np.concatenate(labels)


def _top1(module, xs: list[np.ndarray], y: np.ndarray, batch: int = 500) -> float:
    """``dlopt.compression.distillation.accuracy`` over the evaluation arrays, the module in eval mode for the call."""
    import torch

    was_training = module.training
    module.eval()
    try:
        return accuracy(module, ((*(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])) for x in xs),
                                  torch.from_numpy(y[i:i + batch])) for i in range(0, len(y), batch)))
    finally:
        module.train(was_training)


def _write_npz(path: Path, names: Sequence[str], xs: list[np.ndarray], labels: np.ndarray | None = None) -> Path:
    arrays = {n: np.ascontiguousarray(x, dtype=np.float32) for n, x in zip(names, xs)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)

    return write_file(path, lambda f: np.savez(f, **arrays))


def _calibration(train_loader: Iterable, count: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = []
    seen = 0
    for batch in train_loader:
        xs, _ = split_batch(batch)
        parts.append([x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x) for x in xs])
        seen += len(parts[-1][0])
        if seen >= count:
            break
    return [np.concatenate(p)[:count] for p in zip(*parts)]


def _lean(path: Path) -> Path:
    """Drop the exporter's per-node metadata (source locations: half of a small model's file)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # large weights stay in their .data file
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))
    return path


def compress(
    model: Any,
    example_inputs: Any,
    train_loader: Iterable,
    *,
    eval: Any,  # noqa: A002 - the word users know
    ratio: float = 0.5,
    target: str = "cpu",
    out: str | os.PathLike | None = None,
    epochs: int = 2,
    importance: str = "l2",
    ignored_layers: Sequence[Any] | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    feature_pairs: Any = None,
    lr: float = 1e-3,
    max_accuracy_drop: float = 1.0,
    precision: str = "auto",
    batch: int = 1,
    runs: int = 100,
    threads: int | None = None,
    calib_samples: int = 256,
    progress: Callable[[str, int, int], None] | bool | None = None,
    **compile_options: Any,
) -> CompressResult:
    """Prune ``model`` by ``ratio``, distil it from the original, export both, compile the student.

    ``eval`` is labelled evaluation data: ``(x, y)`` arrays or tensors, or a DataLoader
    of ``(x, y)`` batches.  ``train_loader`` yields ``(x, y)`` batches for distillation
    (its first ``calib_samples`` inputs also calibrate INT8).  ``max_accuracy_drop``
    (points) is the compile's budget against the distilled student's ONNX;
    ``compile_options`` go to :func:`dlopt.compile`.  Returns a :class:`CompressResult`;
    its ``table()`` is what ``compress.md`` holds.
    """
    # the keyword arguments (compile_options among them), for the stages to read
    options = {k: v for k, v in locals().items() if k not in ("model", "example_inputs", "train_loader", "eval")}
    job = _prepare(model, example_inputs, eval, **options)
    # torch's threads follow the runtimes' for the whole run: pruning, exports, ExecuTorch builds and calibration
    with torch_threads(job.threads):
        pruned = _prune(job)
        distilled = _distill(job, pruned, train_loader)
        with parents_made(job.out), output_lock(job.out), staging_dir(job.out) as staged, \
                tempfile.TemporaryDirectory(prefix="dlopt-compress-") as scratch:
            files = _export(job, pruned, distilled, staged)
            reports = _compile(job, distilled, files, train_loader, staged, Path(scratch))
            timings = _measure(job, files, reports, staged)
            result = _write(job, pruned, distilled, files, reports, timings, staged)
            move_into_place(staged, job.out)
    return result


# -- the stages, each returning a frozen value --------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """What every stage reads: the teacher, its inputs and evaluation arrays, the output folder, the options."""

    model: Any
    inputs: tuple
    names: list[str]  # the ONNX input names
    xs: list[np.ndarray]
    y: np.ndarray
    out: Path
    threads: int
    progress: Callable[[str, int, int], None] | bool | None  # what dlopt.compile gets
    options: dict  # compress()'s keyword arguments (ratio, epochs, target, ...)

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(stage, done, total)

    def step(self, stage: str, work: Callable[[], Any]) -> Any:
        """``work()`` between a 0/1 and a 1/1 progress report for ``stage``."""
        self.report(stage, 0, 1)
        value = work()
        self.report(stage, 1, 1)
        return value


@dataclass(frozen=True)
class Pruned:
    result: Any  # dlopt.compression.pruning.PruneResult
    teacher_top1: float
    top1: float


@dataclass(frozen=True)
class Distilled:
    result: Any  # dlopt.compression.distillation.DistillResult
    top1: float


def _prepare(model, example_inputs, eval_data, *, threads, batch, runs, out, target, progress, **options) -> Job:
    if progress is True:
        progress = TerminalProgress()
    threads = int(threads or default_threads())
    inputs = _as_tuple(example_inputs)
    if batch < 1 or runs < 1:
        raise ConfigError("batch and runs must be at least 1")
    xs, y = _eval_arrays(eval_data)
    out = Path(out or f"{type(model).__name__.lower()}-compressed-{target}").resolve()
    check_output_dir(out)
    return Job(model, inputs, forward_names(model, len(inputs)), xs, y, out, threads, progress,
               {**options, "batch": batch, "runs": runs, "target": target})


def _prune(job: Job) -> Pruned:
    o = job.options
    teacher_top1 = job.step("measure the teacher", lambda: _top1(job.model, job.xs, job.y))
    pruned = job.step("prune", lambda: prune(job.model, job.inputs, o["ratio"], importance=o["importance"],
                                             ignored_layers=o["ignored_layers"], global_pruning=o["global_pruning"],
                                             round_to=o["round_to"]))
    top1 = _top1(pruned.module, job.xs, job.y)
    logger.info("%s; top-1 %.2f%% -> %.2f%% before distillation", pruned.report.summary(), 100 * teacher_top1,
                100 * top1)
    return Pruned(pruned, teacher_top1, top1)


def _distill(job: Job, pruned: Pruned, train_loader: Iterable) -> Distilled:
    o, epochs = job.options, job.options["epochs"]
    student = copy.deepcopy(pruned.result.module)
    try:
        steps = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps = 0

    def on_event(event) -> None:
        if event.kind == "step" and steps:
            job.report(f"distil epoch {event.epoch}/{epochs}", (event.step - 1) % steps + 1, steps)

    distilled = distill(job.model, student, train_loader, epochs=epochs, temperature=o["temperature"],
                        alpha=o["alpha"], feature_pairs=o["feature_pairs"], lr=o["lr"], callbacks=[on_event],
                        threads=job.threads)
    return Distilled(distilled, _top1(distilled.student, job.xs, job.y))


def _export(job: Job, pruned: Pruned, distilled: Distilled, staged: Path) -> dict[str, Path]:
    """models/teacher.onnx, pruned.onnx and student.onnx (symbolic batch), and student/ saved whole."""
    (staged / "models").mkdir()
    dynamic = {n: {0: "batch"} for n in job.names}
    files = {}
    for name, module in (("teacher", job.model), ("pruned", pruned.result.module)):
        files[name] = job.step(f"export {name}", lambda module=module, name=name: _lean(export(
            module, job.inputs, staged / "models" / f"{name}.onnx", dynamic_axes=dynamic, input_names=job.names)))

    def student() -> Path:
        save_module(distilled.result.student, job.inputs, staged / "student", report=pruned.result.report)
        return _lean(Path(shutil.copyfile(staged / "student" / "model.onnx", staged / "models" / "student.onnx")))

    files["student"] = job.step("save student", student)
    return files


def _compile(job: Job, distilled: Distilled, files: dict[str, Path], train_loader: Iterable, staged: Path,
             scratch: Path) -> dict:
    """The teacher and the student compiled alike: the speed-up is the pruning's, not the compiler's."""
    import dlopt

    o = job.options
    eval_npz = _write_npz(scratch / "eval.npz", job.names, job.xs, job.y)
    calib_npz = _write_npz(scratch / "calib.npz", job.names, _calibration(train_loader, o["calib_samples"]))
    # each ONNX file with the module it was exported from, for the backends that build from PyTorch (ExecuTorch),
    # and an example at the timing batch: the program they build is exported at that shape
    modules = {"teacher": job.model, "student": distilled.result.student}
    example = tuple(t[:1].expand(o["batch"], *t.shape[1:]).contiguous() for t in job.inputs)
    return {name: dlopt.compile(files[name], target=o["target"], out=staged / COMPILED[name], inputs=eval_npz,
                                calib=calib_npz, max_accuracy_drop=o["max_accuracy_drop"], precision=o["precision"],
                                batch=o["batch"], runs=o["runs"], threads=job.threads, progress=job.progress or None,
                                torch_module=modules[name], example=example, **o["compile_options"])
            for name in ("teacher", "student")}


def _measure(job: Job, files: dict[str, Path], reports: dict, staged: Path) -> dict:
    """Every ONNX model and compiled artefact timed in one interleaved run, each through its runner."""
    import dlopt

    batch = job.options["batch"]
    feed = {n: np.ascontiguousarray(np.repeat(x[:1], batch, axis=0), dtype=np.float32)
            for n, x in zip(job.names, job.xs)}
    # the exported models on ONNX Runtime, the compiled ones as dlopt.load opens them
    runners = {name: LocalRunner(name, lambda path=files[name]: OrtSession(path, session_settings(job.threads)))
               for name in ROWS}
    runners.update({f"{name} compiled": dlopt.load(staged / COMPILED[name], threads=job.threads) for name in reports})
    job.report("time at batch %d" % batch, 0, 1)
    try:
        timings = time_interleaved(runners, feed, runs=job.options["runs"], warmup=10, threads=job.threads)
    finally:
        for runner in runners.values():
            runner.close()
    job.report("time at batch %d" % batch, 1, 1)
    return timings


def _write(job: Job, pruned: Pruned, distilled: Distilled, files: dict[str, Path], reports: dict, timings: dict,
           staged: Path) -> CompressResult:
    """compress.json, compress.md and the manifest, into the staging folder."""
    import onnxruntime

    import dlopt

    report, epochs, target = pruned.result.report, job.options["epochs"], job.options["target"]
    stats = {
        "teacher": (report.params_before, report.macs_before, pruned.teacher_top1, "original"),
        "pruned": (report.params_after, report.macs_after, pruned.top1,
                   f"{job.options['ratio']:.0%} of channels pruned, no distillation"),
        "student": (report.params_after, report.macs_after, distilled.top1, f"pruned, distilled {epochs} epoch(s)"),
    }
    rows = [Row(name, what, params, macs, files[name].stat().st_size, timings[name].to_dict(), top1)
            for name, (params, macs, top1, what) in stats.items()]
    for name, compiled in reports.items():
        chosen = compiled.chosen_candidate()
        params, macs, _, _ = stats[name]
        rows.append(Row(f"{name} compiled", f"{COMPILED[name]}/: {chosen.key} for {target}", params, macs,
                        chosen.measurement.size_bytes, timings[f"{name} compiled"].to_dict(),
                        chosen.measurement.accuracy))
    result = CompressResult(distilled.result.student, rows, report, distilled.result.history, reports, job.out,
                            timing={"batch": job.options["batch"], "threads": job.threads,
                                    "runs": timings["teacher"].runs, "ort": onnxruntime.__version__,
                                    "eval_samples": int(len(job.y))})
    (staged / "compress.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    (staged / "compress.md").write_text(f"# dlopt.compress: {type(job.model).__name__} for {target}\n\n"
                                        f"{result.table()}\n{report.table()}\n")
    (staged / MANIFEST).write_text(json.dumps({
        "schema_version": "1.0", "dlopt_version": dlopt.__version__, "kind": "compress",
        "published": sorted(os.listdir(staged)) + [MANIFEST]}, indent=2) + "\n")
    return result
