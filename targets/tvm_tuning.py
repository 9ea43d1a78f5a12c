"""MetaSchedule auto-tuning for the TVM backend, with a resumable database per model and target.

``tune`` measures schedules for the kernels (tasks) of a model's Relax module and
records them in a ``TuningDatabase``; ``apply_database`` gives the TVM backend the
module with the best recorded schedules applied, to build as usual.

MetaSchedule's own database matches records by kernel alone and ignores the target
(apache/tvm #15549), so records from different hardware would mix: here each
(model, target) pair has its own folder, ``root/<model sha256[:16]>/<target sha256[:16]>/``.
MetaSchedule appends each measured trial as one JSON line, so a run killed at any
point leaves every finished trial on disk; a line cut short by SIGKILL is dropped on
the next open, and the next run continues from the records (``trials`` is the total
a database should reach, not the number to add).

Builds run in worker processes through a builder that does not import
``tvm.s_tir.tensor_intrin`` (about 20 s per worker, mostly CUDA intrinsics); the
scheduled code it compiles already carries any tensorised intrinsic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import stat
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from dlopt.errors import CompileError, ConfigError, DloptError, first_line

logger = logging.getLogger(__name__)
ENV_ROOT = "DLOPT_TUNING_DB"
WORKLOADS, RECORDS, META, LOCK = "database_workload.json", "database_tuning_record.json", "meta.json", ".lock"
FORMAT = 1
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# /proc/cpuinfo flag -> LLVM feature: the vector ISA MetaSchedule's rules and LLVM's vectoriser use.
_CPU_FEATURES = {
    "x86_64": {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
               "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512cd": "avx512cd",
               "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni", "avx512_bf16": "avx512bf16",
               "avx512_fp16": "avx512fp16"},
    "aarch64": {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fullfp16", "i8mm": "i8mm", "sve": "sve"},
}


def default_root() -> Path:
    return Path(os.environ.get(ENV_ROOT) or Path.home() / ".cache" / "dlopt" / "tuning")


def tuning_target(profile, threads: int) -> dict:
    """The LLVM target of ``profile``'s CPU that tuning measures for and the backend builds with.

    On this host's own CPU: LLVM's name for it plus the vector features /proc/cpuinfo
    shows (``+avx512vnni``…, and ``-`` for those the CPU model implies but a VM hides),
    so the search space holds AVX-512/VNNI schedules exactly when they run here.
    A board: its ``mcpu`` and triple.  ``num-cores`` is the thread count the artefact
    runs with (the board's cores, or ``threads`` here), which MetaSchedule tiles for.
    """
    from tvm.target import codegen

    from dlopt.profiles import _host_cpu_flags, host_arch

    if profile.device == "mcu":
        raise ConfigError(f"TVM does not build for {profile.name}, a microcontroller")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    spec: dict = {"kind": "llvm", "mtriple": profile.triple}
    native = profile.mcpu == "native" or (profile.mcpu is None and profile.device == "cpu"
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
    import tvm
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


def target_key(target: dict) -> str:
    return hashlib.sha256(json.dumps(target, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_digest(model, shapes: dict | None = None) -> str:
    """sha256 of the model the TVM backend builds and of the static input shapes it builds for."""
    import onnx_ir as ir

    from dlopt.targets.tvm import input_specs

    digest = hashlib.sha256(ir.serde.serialize_model(model).SerializeToString(deterministic=True))
    digest.update(json.dumps(input_specs(model, shapes), sort_keys=True).encode())
    return digest.hexdigest()


class TuningDatabase:
    """MetaSchedule's JSON database for one model on one target, plus ``meta.json``.

    Folders are created 0700; one that is a symlink, not this user's, or writable by
    others is refused, and so are files in it that are not plain files.  dlopt only
    appends to and trims the torn last line of files in a folder holding its
    ``meta.json``; it deletes nothing.
    """

    def __init__(self, root: Path, model_sha256: str, target: dict) -> None:
        if not (isinstance(model_sha256, str) and len(model_sha256) == 64
                and all(c in "0123456789abcdef" for c in model_sha256)):
            raise ConfigError(f"model_sha256 must be a sha256 hex digest, not {model_sha256!r:.80}")
        if not isinstance(target, dict) or "kind" not in target:
            raise ConfigError(f"a tuning target is a TVM target dict with a kind, not {target!r:.80}")
        self.root, self.model_sha256, self.target = Path(root), model_sha256, dict(target)
        self.target_key = target_key(self.target)
        self.path = self.root / model_sha256[:16] / self.target_key[:16]

    def __repr__(self) -> str:
        return f"TuningDatabase({self.path})"

    def meta(self) -> dict | None:
        """The folder's meta.json, or None when there is no database yet."""
        try:
            return json.loads(_read(self.path / META))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path / META} is unreadable ({first_line(exc)}); "
                              f"move {self.path} away to start afresh") from exc

    def record_count(self) -> int:
        """Trials recorded (complete lines of the record file), 0 without a database."""
        try:
            return _read(self.path / RECORDS).count(b"\n")
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def writing(self):
        """An exclusive, repaired database to tune into: yields MetaSchedule's JSONDatabase."""
        from tvm.s_tir import meta_schedule as ms

        self._create()
        with _locked(self.path / LOCK):
            for name in (WORKLOADS, RECORDS):
                _trim_torn_line(self.path / name)
            try:
                database = ms.database.JSONDatabase(str(self.path / WORKLOADS), str(self.path / RECORDS),
                                                    module_equality="structural")
            except Exception as exc:
                raise ConfigError(f"tuning database {self.path} is damaged ({first_line(exc)}); "
                                  f"move it away to start afresh") from exc
            yield database

    def snapshot(self):
        """The records so far as an in-memory database (None when there are none), without locking
        or changing the folder: a tuning run may be appending to it meanwhile."""
        from tvm.s_tir import meta_schedule as ms

        if not os.path.lexists(self.path):
            return None
        self._check_folders()
        if self.meta() is None:
            return None
        # Records first: every record's workload line was written before the record.
        records, workloads = (_read(self.path / n) for n in (RECORDS, WORKLOADS))
        records, workloads = (data[:data.rfind(b"\n") + 1] for data in (records, workloads))
        if not records:
            return None
        with tempfile.TemporaryDirectory(prefix="dlopt-tuning-") as tmp:
            (Path(tmp) / WORKLOADS).write_bytes(workloads)
            (Path(tmp) / RECORDS).write_bytes(records)
            try:
                return ms.database.JSONDatabase(str(Path(tmp) / WORKLOADS), str(Path(tmp) / RECORDS),
                                                allow_missing=False, module_equality="structural")
            except Exception as exc:
                raise ConfigError(f"tuning database {self.path} is damaged ({first_line(exc)}); "
                                  f"move it away to start afresh") from exc

    def update_meta(self, *, seconds: float = 0.0) -> dict:
        """Record the trial count and add ``seconds`` of tuning to meta.json (written atomically)."""
        import tvm

        from dlopt import __version__

        meta = self.meta() or {}
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta = {"format": FORMAT, "model_sha256": self.model_sha256, "target": self.target,
                "target_key": self.target_key, "trials": self.record_count(),
                "seconds": round(float(meta.get("seconds", 0.0)) + seconds, 1),
                "dlopt_version": __version__, "tvm_version": tvm.__version__,
                "created": meta.get("created", now), "updated": now}
        fd, tmp = tempfile.mkstemp(prefix=".meta-", dir=self.path)
        with os.fdopen(fd, "w") as out:
            json.dump(meta, out, indent=2)
        os.replace(tmp, self.path / META)
        return meta

    def _create(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (self.path.parent, self.path):
            self._check_folders(upto=folder.parent)  # nothing is created in a folder others control
            with contextlib.suppress(FileExistsError):
                folder.mkdir(mode=0o700)
        self._check_folders()
        meta = self.meta()
        if meta is None:
            if any(self.path.iterdir()):
                raise ConfigError(f"{self.path} holds files but no {META}: not a dlopt tuning database; "
                                  f"dlopt leaves it alone (choose another --db)")
            self.update_meta()
        elif meta.get("model_sha256") != self.model_sha256 or meta.get("target") != self.target:
            raise ConfigError(f"{self.path} holds records for another model or target ({META} says "
                              f"{meta.get('target')}); move it away")

    def _check_folders(self, upto: Path | None = None) -> None:
        for path, follow in ((self.root, True), (self.path.parent, False), (self.path, False)):
            if upto is not None and len(path.parts) > len(upto.parts):
                return
            try:
                why = _distrust(os.stat(path) if follow else os.lstat(path))
            except OSError as exc:
                why = exc.strerror or str(exc)
            if why:
                raise ConfigError(f"refusing the tuning database folder {path}: {why}")
        for name in () if upto else (WORKLOADS, RECORDS, META, LOCK):
            with contextlib.suppress(FileNotFoundError):
                if not stat.S_ISREG(os.lstat(self.path / name).st_mode):
                    raise ConfigError(f"refusing {self.path / name}: not a plain file (a symlink?)")


def _distrust(st: os.stat_result) -> str | None:
    if not stat.S_ISDIR(st.st_mode):
        return "not a folder (a symlink?)"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by you"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def _trim_torn_line(path: Path) -> None:
    """Drop an unfinished last line (a run killed while appending it)."""
    try:
        fd = os.open(path, os.O_RDWR | _NOFOLLOW)
    except FileNotFoundError:
        return
    with os.fdopen(fd, "r+b") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            logger.warning("dropping the unfinished last line of %s (%d bytes) left by an interrupted "
                           "tuning run", path, len(data) - keep)
            fh.truncate(keep)


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; one tuning run at a time is the user's job
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another dlopt tune is writing {path.parent}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


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
    import tvm
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
    import tvm
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
    import tvm
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
    "tuning" or "tuning, kernels ~X ms" (the tuned kernels' summed best latency).  Past
    ``time_budget_s`` no new round starts and the result says so.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from dlopt.targets import tvm as backend

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"trials must be a positive integer, got {trials!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"the time budget must be positive, got {time_budget_s!r}")
    if profile.device != "cpu":
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

    from dlopt.model_io import load_ir

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
        self.done, self.stopped, self.saved_seconds = 0, None, 0.0
        self.history: list[list[float]] = [[] for _ in tasks]  # best ms after each round, per task
        self.weights = [float(t.weight) for t in tasks]
        self._rng = random.Random(0)
        self._meta_at = started

    def tune(self, profile, threads, runner) -> None:
        from tvm.s_tir import meta_schedule as ms

        per_round = min(64, max(1, math.ceil(self.wanted / len(self.tasks))))
        # MetaSchedule's population of 512 costs ~20 s of search per round on 2 cores: small
        # rounds get a smaller one, rounds of 32 and more the default.
        population = min(512, max(64, 16 * per_round))
        strategy = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                         init_min_unmeasured=min(50, population))
        # Not extracted_tasks_to_tune_contexts: it reconfigures logging process-wide (dictConfig,
        # a console handler on stdout); MetaSchedule's per-trial log goes to dlopt's debug log.
        search_log = logging.getLogger(f"{__name__}.search")
        contexts = [ms.TuneContext(mod=t.dispatched[0], target=t.target, space_generator="post-order-apply",
                                   search_strategy=strategy, task_name=t.task_name, logger=search_log,
                                   rand_state=seed, num_threads=os.cpu_count() or 1).clone()
                    for t, seed in zip(self.tasks, ms.utils.fork_seed(None, n=len(self.tasks)))]
        # Tasks with the fewest records go first, so a resumed run spends its warm-up where
        # the killed one did not get to.
        known = len(self.database)
        counts = [len(self.database.get_top_k(self.database.commit_workload(t.mod), known))
                  if known and self.database.has_workload(t.mod) else 0 for t in contexts]
        self.pending = sorted(range(len(contexts)), key=lambda i: counts[i])
        self.progress("starting MetaSchedule", 0, self.wanted)
        with _noting_interrupts() as interrupts, _builder(profile) as builder, \
                _runner(runner, threads) as runner:
            try:
                ms.tune.tune_tasks(  # work_dir only holds a "json" database, and ours is given
                    tasks=contexts, task_weights=self.weights, work_dir=str(self.db.path),
                    max_trials_global=self.wanted, num_trials_per_iter=per_round, builder=builder,
                    runner=runner, database=self.database, cost_model="xgb", task_scheduler=_scheduler(self),
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
        self.progress(f"tuning, kernels ~{estimate:.6f} ms" if estimate else "tuning",
                      min(self.done, self.wanted), self.wanted)

    def next_task_id(self, scheduler) -> int:
        """MetaSchedule's gradient-based choice (warm-up round, then the task whose latency
        falls fastest), ending the run once the time budget is spent."""
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

    def _estimate(self) -> float:
        return sum(w * h[-1] for w, h in zip(self.weights, self.history) if h and h[-1] < math.inf)

    def result(self) -> TuneResult:
        import tvm

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


def _median_ms(result) -> float:
    if result.error_msg is not None or not result.run_secs:
        return math.inf
    secs = sorted(float(s) for s in result.run_secs)
    return 1e3 * secs[len(secs) // 2]


def _scheduler(run: _Run):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class BudgetedGradient(PyTaskScheduler):
        def next_task_id(self) -> int:
            return run.next_task_id(self._outer())

    return BudgetedGradient()


def _progress_callback(run: _Run):
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
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    from dlopt.profiles import host_arch

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
