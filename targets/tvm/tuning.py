"""MetaSchedule auto-tuning for the TVM backend, with a resumable database per model and target.

``tune`` measures schedules for the kernels (tasks) of a model's Relax module and
records them in a ``TuningDatabase``; ``apply_database`` gives the TVM backend the
module with the best recorded schedules applied, to build as usual.

Each (model, target) pair has its own database (``dlopt.targets.tvm.tuning_db``: keyed
by target too, which MetaSchedule's own is not, apache/tvm #15549); a run killed at any
point leaves every finished trial there, and the next run continues from the records
(``trials`` is the total a database should reach, not the number to add).

Builds run in worker processes through a builder that does not import
``tvm.s_tir.tensor_intrin`` (about 20 s per worker, mostly CUDA intrinsics); the
scheduled code it compiles already carries any tensorised intrinsic.  The tuning
process itself imports it through ``meta_schedule()``, in 3 s instead of 44.
Builder and runner workers import TVM without torch (``workers_without_torch``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

from dlopt.core.errors import CompileError, ConfigError, DloptError, first_line
from dlopt.core.profiles import DeviceKind, _host_cpu_flags, host_arch
from dlopt.targets.tvm import import_tvm, workers_without_torch
from dlopt.targets.tvm.tuning_db import (ENV_ROOT, LOCK, META, RECORDS, WORKLOADS, TuningDatabase,
                                         default_root, model_digest, target_key)

__all__ = ["ENV_ROOT", "LOCK", "META", "RECORDS", "WORKLOADS", "TuneResult", "TuningDatabase", "apply_database",
           "build_kernel", "default_root", "lowering_pipeline", "model_digest", "target_key", "tune", "tuning_target"]

logger = logging.getLogger(__name__)


def _cheap_stack(context: int = 1) -> list:
    """``inspect.stack()`` without ``inspect.getmodule``, which scans every module in ``sys.modules``
    for each frame whose file it has not mapped yet (import machinery, "<ast>"): the same frames,
    file names, line numbers and source line."""
    import inspect
    import linecache
    import sys

    frame, stack = sys._getframe(1), []
    while frame is not None:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        line = linecache.getline(filename, lineno, frame.f_globals) if context else ""
        stack.append(inspect.FrameInfo(frame, filename, lineno, frame.f_code.co_name,
                                       [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return stack


def meta_schedule():
    """``tvm.s_tir.meta_schedule``, with the tensor intrinsics a ``TuneContext`` imports already imported.

    Importing ``tvm.s_tir.tensor_intrin`` parses a few hundred TVMScript functions, each taking
    ``inspect.stack()``: 44 s on a 2-core AVX2 EPYC (cProfile: 79 of 88 s in ``inspect.getmodule``),
    3 s with ``_cheap_stack`` in its place for the import.  Every ``dlopt tune`` paid that.
    """
    import inspect
    import sys

    import_tvm()
    from tvm.s_tir import meta_schedule as ms

    if "tvm.s_tir.tensor_intrin" not in sys.modules:
        saved, inspect.stack = inspect.stack, _cheap_stack
        try:
            import tvm.s_tir.tensor_intrin  # noqa: F401
        finally:
            inspect.stack = saved
    return ms
# /proc/cpuinfo flag -> LLVM feature: the vector ISA MetaSchedule's rules and LLVM's vectoriser use.
_CPU_FEATURES = {
    "x86_64": {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
               "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512cd": "avx512cd",
               "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "avx512_bf16": "avx512bf16",
               "avx512_fp16": "avx512fp16"},
    "aarch64": {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fullfp16", "i8mm": "i8mm", "sve": "sve"},
}


def tuning_target(profile, threads: int) -> dict:
    """The LLVM target of ``profile``'s CPU that tuning measures for and the backend builds with.

    On this host's own CPU: LLVM's name for it plus the vector features /proc/cpuinfo
    shows (``+avx512vnni``…, and ``-`` for those the CPU model implies but a VM hides),
    so the search space holds AVX-512/VNNI schedules exactly when they run here.
    A board: its ``mcpu`` and triple.  ``num-cores`` is the thread count the artefact
    runs with (the board's cores, or ``threads`` here), which MetaSchedule tiles for.
    """
    import_tvm()
    from tvm.target import codegen

    if profile.device is DeviceKind.MCU:
        raise ConfigError(f"TVM does not build for {profile.name}, a microcontroller")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    spec: dict = {"kind": "llvm", "mtriple": profile.triple}
    native = profile.mcpu == "native" or (profile.mcpu is None and profile.device is DeviceKind.CPU
                                          and profile.arch == host_arch())
    mcpu = codegen.llvm_get_system_cpu() if native else profile.mcpu
    if mcpu:
        spec["mcpu"] = mcpu
    if native:
        mattr = _host_mattr(profile.triple, mcpu, profile.arch, _host_cpu_flags())
    else:
        mattr = ("+neon",) if profile.arch == "aarch64" else ()
    if mattr:
        spec["mattr"] = list(mattr)
    spec["num-cores"] = profile.threads_for(threads)[0]
    return spec


@functools.lru_cache(maxsize=4)
def _host_mattr(triple: str, mcpu: str | None, arch: str, flags: frozenset[str]) -> tuple[str, ...]:
    tvm = import_tvm()
    from tvm.target import codegen

    table = _CPU_FEATURES.get(arch)
    if not table or not flags:  # no /proc/cpuinfo (macOS): LLVM's CPU model alone decides
        return ()
    implied = tvm.target.Target({"kind": "llvm", "mtriple": triple, **({"mcpu": mcpu} if mcpu else {})})
    mattr = []
    for flag, feature in sorted(table.items(), key=lambda kv: kv[1]):
        if flag in flags:
            mattr.append(f"+{feature}")
        elif codegen.target_has_features(feature, implied):
            mattr.append(f"-{feature}")
    return tuple(mattr)


@dataclasses.dataclass(frozen=True)
class TuneResult:
    tasks: int  # distinct kernels MetaSchedule tunes
    tuned_tasks: int  # tasks with at least one valid record
    trials_run: int  # trials measured by this run
    trials_in_db: int  # trials recorded in the database after it
    seconds: float
    best_ms: dict[str, float]  # task name -> best recorded latency of the kernel
    estimate_ms: float  # sum of weight * best latency over the tuned tasks
    db_path: Path
    stopped: str | None = None  # why tuning stopped early, if it did

    def summary(self) -> str:
        text = (f"{self.tuned_tasks} of {self.tasks} tasks tuned; {self.trials_run} new trials "
                f"({self.trials_in_db} in {self.db_path}) in {self.seconds:.0f} s")
        return f"{text}; {self.stopped}" if self.stopped else text


def _fused(mod, target):
    """The Relax module lowered to the fused TIR kernels that tuning and the build both see."""
    tvm = import_tvm()
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline  # what relax.get_default_pipeline runs for llvm

    with target:
        # Weights are constants: marking them layout-free lets MetaSchedule choose their layout,
        # and apply_database folds that relayout into the constants at build time.
        return tvm.transform.Sequential([*pipeline.library_dispatch_passes(target),
                                         *pipeline.legalize_passes(target),
                                         relax.transform.AttachAttrLayoutFreeBuffers()])(mod)


def lowering_pipeline(target):
    """The rest of the default Relax pipeline, for a module ``apply_database`` returned."""
    tvm = import_tvm()
    from tvm.relax.backend.cpu_generic import pipeline  # its __init__ omits dataflow_lower_passes

    @tvm.transform.module_pass(opt_level=0)
    def lower(mod, _ctx):
        with target:
            return tvm.transform.Sequential(pipeline.dataflow_lower_passes(target)
                                            + pipeline.finalize_passes(target))(mod)

    return lower


def apply_database(mod, target: dict, db: TuningDatabase):
    """``mod`` fused, with each kernel the database holds a record for scheduled by its best record.

    Returns (module, tuned tasks, tasks); build the module with ``lowering_pipeline``.
    """
    tvm = import_tvm()
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    tvm_target = tvm.target.Target(target)
    fused = _fused(mod, tvm_target)
    tasks = ms.relax_integration.extract_tasks(fused, tvm_target, module_equality="structural")
    database = db.snapshot()
    if database is None:
        return fused, 0, len(tasks)
    tuned = sum(database.query_tuning_record(t.dispatched[0], tvm_target, t.task_name) is not None
                for t in tasks)
    with tvm_target, database:
        applied = tvm.transform.Sequential([relax.transform.MetaScheduleApplyDatabase(),
                                            relax.transform.SplitLayoutRewritePreproc(),
                                            relax.transform.FoldConstant()])(fused)
    return applied, tuned, len(tasks)


def tune(model, profile, *, trials: int, time_budget_s: float | None = None, db: TuningDatabase,
         threads: int, runner=None, progress=None, shapes: dict | None = None) -> TuneResult:
    """Tune ``model`` (an onnx_ir Model or an ONNX file) for ``profile`` until ``db`` holds ``trials``.

    ``runner`` is any MetaSchedule Runner (an RPCRunner for a board); the default measures
    here.  ``progress(stage, done, total)`` is called as trials finish; ``stage`` reads
    "tuning, K of M kernels timed" until every task has a time, then "tuning, model ~X ms
    (first ~Y ms)": the model's estimated latency (every task's best so far times its weight,
    which only falls) and that estimate when every task was first timed.  Past
    ``time_budget_s`` no new round starts and the result says so.
    """
    tvm = import_tvm()

    from dlopt.targets.tvm import backend

    ms = meta_schedule()

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"the time budget must be positive, got {time_budget_s!r}")
    if profile.device is not DeviceKind.CPU:
        raise ConfigError(f"tuning covers CPU targets; {profile.name} is a {profile.device} target")
    target = tuning_target(profile, threads)
    if target != db.target:
        raise ConfigError(f"{db} is for target {db.target}, not {profile.name}'s {target}")
    if runner is None and not profile.runs_here():
        raise ConfigError(f"{profile.name} cannot be measured on this machine; pass a runner for the device "
                          f"(an RPC tracker and key)")
    model = _as_ir_model(model)
    if model_digest(model, shapes) != db.model_sha256:
        raise ConfigError(f"{db} belongs to another model (its sha256 starts {db.model_sha256[:16]})")
    started = time.monotonic()
    progress = progress or (lambda stage, done, total: None)
    tvm_target = tvm.target.Target(target)
    with db.writing() as database:
        try:
            progress("extracting tasks", 0, 0)
            mod = backend.relax_module(model, backend.input_specs(model, shapes))
            tasks = ms.relax_integration.extract_tasks(_fused(mod, tvm_target), tvm_target,
                                                       module_equality="structural")
        except DloptError:
            raise
        except Exception as exc:
            raise CompileError(f"TVM could not extract tuning tasks: {first_line(exc)}") from exc
        wanted = trials - len(database)
        run = _Run(tasks, database, db, started, time_budget_s, max(wanted, 0), progress)
        try:
            if wanted > 0 and tasks:
                run.tune(profile, threads, runner)
        finally:  # an interrupted run's trials are in the database: count them
            db.update_meta(seconds=time.monotonic() - started - run.saved_seconds)
        return run.result()


def _as_ir_model(model):
    import onnx
    import onnx_ir as ir

    from dlopt.core.model_io import load_ir

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return load_ir(Path(model))


class _Run:
    """One tuning run: MetaSchedule's task loop, the progress and the time budget around it."""

    def __init__(self, tasks, database, db, started, budget, wanted, progress):
        self.tasks, self.database, self.db, self.started = tasks, database, db, started
        self.deadline = None if budget is None else started + budget
        self.budget, self.wanted, self.progress = budget, wanted, progress
        self.done, self.sent, self.stopped, self.saved_seconds = 0, 0, None, 0.0
        self.history: list[list[float]] = [[] for _ in tasks]  # best ms after each round, per task
        self.recorded = [math.inf for _ in tasks]  # best ms the database held before this run, per task
        self.first_estimate: float | None = None
        self.weights = [float(t.weight) for t in tasks]
        self._rng = random.Random(0)
        self._meta_at = started

    def tune(self, profile, threads, runner) -> None:
        ms = meta_schedule()

        per_round = min(64, max(1, math.ceil(self.wanted / len(self.tasks))))
        # MetaSchedule's population of 512 costs ~20 s of search per round on 2 cores: small
        # rounds get a smaller one, rounds of 32 and more the default.
        population = min(512, max(64, 16 * per_round))
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                         init_min_unmeasured=min(50, population))
        # The XGBoost cost model trains with --threads threads, not every core: on a busy machine the idle
        # ones spin (an 8-trial tune of the test CNN with one thread on 2 cores: 14.1 -> 9.3 CPU-s in this
        # process, 27 -> 21 s).  The same model otherwise (tune_tasks would make it with the tasks' cores).
        cost_model = ms.cost_model.XGBModel(num_tuning_cores=min(threads, os.cpu_count() or 1), tree_method="auto")
        # Not extracted_tasks_to_tune_contexts: it reconfigures logging process-wide (dictConfig,
        # a console handler on stdout); MetaSchedule's per-trial log goes to dlopt's debug log.
        search_log = logging.getLogger(f"{__name__}.search")
        contexts = [ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                                   search_strategy=_capped(strategy, self), task_name=t.task_name, logger=search_log,
                                   rand_state=seed, num_threads=os.cpu_count() or 1).clone()
                    for t, seed in zip(self.tasks, ms.utils.fork_seed(None, n=len(self.tasks)))]
        # Tasks with the fewest records go first, so a resumed run spends its warm-up where
        # the killed one did not get to.
        known = len(self.database)
        tops = [self.database.get_top_k(self.database.commit_workload(t.mod), known)
                if known and self.database.has_workload(t.mod) else [] for t in contexts]
        counts = [len(top) for top in tops]
        self.recorded = [min((_record_ms(r) for r in top), default=math.inf) for top in tops]
        self.pending = sorted(range(len(contexts)), key=lambda i: counts[i])
        self.progress("starting MetaSchedule", 0, self.wanted)
        # workers_without_torch outlives the pools: they start (and restart) workers while tuning
        with _noting_interrupts() as interrupts, workers_without_torch(), _builder(profile) as builder, \
                _runner(runner, threads) as runner:
            try:
                ms.tune.tune_tasks(  # work_dir only holds a "json" database, and ours is given
                    tasks=contexts, task_weights=self.weights, work_dir=str(self.db.path),
                    max_trials_global=self.wanted, num_trials_per_iter=per_round, builder=builder,
                    runner=runner, database=self.database, cost_model=cost_model, task_scheduler=_scheduler(self),
                    module_equality="structural",
                    measure_callbacks=[*ms.MeasureCallback.create("default"), _progress_callback(self)])
            except (DloptError, KeyboardInterrupt):
                raise
            except Exception as exc:
                if interrupts:
                    raise KeyboardInterrupt from exc
                raise CompileError(f"MetaSchedule tuning failed: {first_line(exc)}") from exc

    def measured(self, task_id: int, runner_results) -> None:
        """A round of ``task_id`` is in the database: count it, keep its best for the scheduler."""
        best = min((_median_ms(r) for r in runner_results), default=math.inf)
        history = self.history[task_id]
        history.append(min(best, history[-1]) if history else best)
        self.done += len(runner_results)
        now = time.monotonic()
        if now - self._meta_at > 30:  # a killed run's meta.json stays close to its records
            self.db.update_meta(seconds=now - self._meta_at)
            self.saved_seconds += now - self._meta_at
            self._meta_at = now
        estimate = self._estimate()
        if estimate is None:
            timed = sum(bool(h) or r < math.inf for h, r in zip(self.history, self.recorded))
            stage = f"tuning, {timed} of {len(self.tasks)} kernels timed"
        else:
            self.first_estimate = self.first_estimate or estimate
            stage = f"tuning, model ~{estimate:.6f} ms (first ~{self.first_estimate:.6f} ms)"
        self.progress(stage, min(self.done, self.wanted), self.wanted)

    def next_task_id(self, scheduler) -> int:
        """MetaSchedule's gradient-based choice (warm-up round, then the task whose latency
        falls fastest), ending the run once the time budget is spent."""
        import_tvm()
        from tvm.s_tir.meta_schedule import _ffi_api

        records = scheduler.tasks_
        for i in range(len(records)):
            _ffi_api.TaskSchedulerTouchTask(scheduler, i)
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = f"stopped at the time budget of {self.budget:g} s"
            return -1
        alive = [i for i in range(len(records)) if not records[i].is_terminated]
        while self.pending:
            task = self.pending.pop(0)
            if task in alive:
                return task
        if not alive:
            return -1
        window, alpha = 3, 0.2
        grads = []
        for i in alive:
            history = self.history[i]
            if history and history[-1] < math.inf:
                g1 = (history[-1 - window] - history[-1]) / window if len(history) > window else 0.0
                grads.append((alpha * g1 + (1 - alpha) * history[-1] / len(history)) * self.weights[i])
            else:
                grads.append(-1e9)
        if max(grads) == min(grads):
            task = self._rng.choice(alive)
        else:
            task = alive[grads.index(max(grads))]
        if records[task].runner_futures is not None:
            _ffi_api.TaskSchedulerJoinRunningTask(scheduler, task)
        return task

    def _estimate(self) -> float | None:
        """The whole model's latency as its kernels add up: each task's best so far (this run's or the
        database's) times its weight; None until every task has been timed once."""
        best = [min(h[-1] if h else math.inf, r) for h, r in zip(self.history, self.recorded)]
        if not best or math.inf in best:
            return None
        return sum(w * b for w, b in zip(self.weights, best))

    def take(self, candidates: list) -> list:
        """The part of a round that fits in the trials wanted: MetaSchedule checks its global limit
        only before a round, so a round of up to ``num_trials_per_iter`` could pass it (32 ran 33)."""
        room = max(0, self.wanted - self.sent)
        taken = list(candidates)[:room]
        self.sent += len(taken)
        return taken

    def result(self) -> TuneResult:
        tvm = import_tvm()

        best = {}
        target = tvm.target.Target(self.db.target)
        for task in self.tasks:
            record = self.database.query_tuning_record(task.dispatched[0], target, task.task_name)
            if record is not None and record.run_secs:
                best[task.task_name] = 1e3 * sum(float(s) for s in record.run_secs) / len(record.run_secs)
        estimate = sum(float(t.weight) * best[t.task_name] for t in self.tasks if t.task_name in best)
        return TuneResult(tasks=len(self.tasks), tuned_tasks=len(best), trials_run=self.done,
                          trials_in_db=len(self.database), seconds=time.monotonic() - self.started,
                          best_ms=best, estimate_ms=estimate, db_path=self.db.path, stopped=self.stopped)


@contextlib.contextmanager
def _noting_interrupts():
    """Notes SIGINT for the block: TVM's C++ loop turns the KeyboardInterrupt into a bare RuntimeError."""
    import signal
    import threading

    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGINT)

    def note(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _record_ms(record) -> float:
    secs = sorted(float(s) for s in record.run_secs or ())
    return 1e3 * secs[len(secs) // 2] if secs else math.inf


def _median_ms(result) -> float:
    if result.error_msg is not None or not result.run_secs:
        return math.inf
    secs = sorted(float(s) for s in result.run_secs)
    return 1e3 * secs[len(secs) // 2]


def _scheduler(run: _Run):
    import_tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class BudgetedGradient(PyTaskScheduler):
        def next_task_id(self) -> int:
            return run.next_task_id(self._outer())

    return BudgetedGradient()


def _capped(strategy, run: _Run):
    """``strategy`` with each round cut to the trials ``run`` still wants (see ``_Run.take``)."""
    import_tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    @derived_object
    class Capped(PySearchStrategy):
        def __init__(self, inner) -> None:
            self.inner = inner

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self):
            candidates = self.inner.generate_measure_candidates()
            return (run.take(candidates) or None) if candidates is not None else None

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return Capped(self.inner.clone())

    return Capped(strategy)


def _progress_callback(run: _Run):
    import_tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            run.measured(task_id, runner_results)

    return Progress()


@contextlib.contextmanager
def _builder(profile):
    """A MetaSchedule builder whose worker processes outlive a round (each one imports TVM, ~2 s)
    and link each kernel into a shared library (a board's with its cross compiler)."""
    import_tvm()
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    compiler = profile.cross_compiler if profile.arch != host_arch() else None
    timeout = 60.0

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=os.cpu_count() or 1, timeout=timeout,
                                          maximum_process_uses=64)  # TVM's workers leak memory

        def build(self, build_inputs):
            jobs = [(i.mod, i.target, compiler) for i in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(_build_job, jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout:g} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {outcome.value}"))
            return results

    builder = PooledBuilder()
    try:
        yield builder
    finally:
        builder.pool.shutdown(wait=False)


def _build_job(job) -> str:
    return build_kernel(*job)


def build_kernel(mod, target, compiler: str | None = None) -> str:
    """Build one candidate kernel into a shared library; its path (runs in a builder worker).

    MetaSchedule's default build imports ``tvm.s_tir.tensor_intrin`` first; the scheduled
    code here already holds any tensorised intrinsic, so this one does not.
    """
    import shutil

    import_tvm()
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support import cc

    module = build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)
    folder = tempfile.mkdtemp(prefix="dlopt-kernel-")  # MetaSchedule removes it after the run
    try:
        path = os.path.join(folder, "kernel.so")
        module.export_library(path, **({"fcompile": cc.cross_compiler(compiler)} if compiler else {}))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


@contextlib.contextmanager
def _runner(runner, threads: int):
    """``runner``, or one measuring here with ``threads`` threads (its worker stopped afterwards)."""
    import_tvm()
    from tvm.s_tir import meta_schedule as ms

    if runner is not None:
        yield runner
        return
    local = ms.runner.LocalRunner(timeout_sec=60.0, initializer=functools.partial(_worker_threads, threads))
    try:
        yield local
    finally:
        local.pool.shutdown(wait=False)


def _worker_threads(threads: int) -> None:
    """Runner worker: measure with the thread pool the artefact will have (set before TVM sizes it)."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
