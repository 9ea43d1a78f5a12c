"""CompileConfig: everything one compile needs, checked before any work starts."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from dlopt.core.errors import ConfigError
from dlopt.core.remote import RemoteDevice
from dlopt.core.precisions import CALIB_METHODS, CHOICES as PRECISIONS

RANDOM_SAMPLES = 20  # random feeds compared with the original when there is no evaluation data
EVAL_SAMPLES = 10_000  # evaluation samples read at most unless samples says otherwise


@dataclass(frozen=True)
class DataOptions:
    """What the model is evaluated and calibrated on (``--eval``, ``--calib`` and their options)."""

    # evaluation data (.npz: one array per input, first axis = samples, optional integer ``labels`` for
    # top-1 accuracy); random feeds when None
    inputs: Any = None
    samples: int | None = None  # random feeds (default 20), or at most this many --eval samples (10000)
    seed: int = 0
    # calibration data for int8 (.npz, image folder, iterable of feed dicts, torch DataLoader); ``inputs``
    # or random feeds when None (the report says so)
    calib: Any = None
    calib_samples: int = 256
    calib_method: str = "auto"
    calib_preprocess: Any = None  # dlopt.calibration.ImagePreprocess for image folders
    # inputs the same for every sample (a sample rate): a number (filling the input) or an array, by input name
    constants: Mapping[str, Any] | None = None
    # the attention-mask input whose zeros mark padding the per-token metric skips; None: detect; False: none
    mask_input: str | bool | None = None

    @property
    def random_samples(self) -> int:
        return self.samples or RANDOM_SAMPLES

    @property
    def eval_limit(self) -> int:
        """Evaluation samples read at most: evaluation data is held in memory, so it is capped."""
        return self.samples or EVAL_SAMPLES


@dataclass(frozen=True)
class BudgetOptions:
    """What "still accurate" means: the budget, the metric it is in, and the mixed-precision search."""

    # budget in percentage points of the score (top-1 accuracy with labels, else top-1 agreement with the
    # original, else cosine similarity, or ``metric``'s value)
    max_accuracy_drop: float = 1.0
    # seconds the mixed-precision search may take; the best model found by then is kept
    search_time: float = 120.0
    # top1 | cosine | rel-error | "module:function" | f(first_outputs, labels) -> float in [0, 1], higher is
    # better; None: by the outputs
    metric: str | Callable | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TimingOptions:
    """How candidates are timed: runs, budgets, threads and the shapes timed."""

    runs: int = 100
    warmup: int = 10
    # seconds the interleaved timing of all candidates may take together; past it each gets fewer runs
    # (never under dlopt.measure.timing.MIN_RUNS) and the report says so
    timing_budget_s: float = 30.0
    # seconds one ONNX Runtime run of the original model may take while its reference outputs are made: a
    # Loop with a huge trip count never ends, and the run is stopped past it (exit 2 naming --reference-timeout)
    reference_timeout_s: float = 600.0
    threads: int | None = None
    batch: int | None = None  # timing batch for a symbolic first dim [1]
    shapes: Mapping[str, tuple[int, ...]] | None = None  # declared timing shapes by input name, or one size by dim name

    @property
    def thread_count(self) -> int:
        return int(self.threads or default_threads())


@dataclass(frozen=True)
class OutputOptions:
    """Where the output goes and how it is written."""

    out: Path | None = None
    cache: bool = True  # reuse verified builds from $DLOPT_CACHE (~/.cache/dlopt)
    wait: float = 0.0  # seconds to wait for another compile writing the same output folder


@dataclass(frozen=True)
class TvmOptions:
    """TVM's own options: tuning databases and the device farm its libraries run on."""

    # TVM tuning databases: a folder [default: $DLOPT_TUNING_DB or ~/.cache/dlopt/tuning], or False for none
    tuning_db: str | os.PathLike | bool | None = None
    rpc_tracker: str | None = None  # HOST:PORT of a TVM RPC tracker
    rpc_key: str | None = None  # the key its servers for the target device registered with

    @property
    def remote(self) -> RemoteDevice | None:
        """The RemoteDevice of ``rpc_tracker``/``rpc_key``, or None."""
        if self.rpc_tracker is None:
            return None
        return RemoteDevice.parse(self.rpc_tracker, self.rpc_key)


@dataclass(frozen=True)
class McuOptions:
    """A microcontroller build's limits."""

    max_ram: int | None = None  # bytes of RAM a microcontroller build may use (arena + data + stack)
    max_flash: int | None = None  # bytes of flash it may use (code + weights + data)


@dataclass(frozen=True)
class SourceOptions:
    """The PyTorch module the ONNX model was exported from, for the backends that build from it (ExecuTorch)."""

    torch_module: Any = field(default=None, compare=False)  # a torch.nn.Module, in eval mode when built
    example: Any = field(default=None, compare=False)  # its example input: a tensor or a tuple of tensors


SECTIONS: dict[str, type] = {"data": DataOptions, "budget": BudgetOptions, "timing": TimingOptions,
                             "output": OutputOptions, "tvm": TvmOptions, "mcu": McuOptions, "source": SourceOptions}
# each option's section, by its name (the names of ``dlopt.compile``'s keyword arguments)
SECTION_OF: dict[str, str] = {f.name: section for section, kind in SECTIONS.items() for f in fields(kind)}


@dataclass(frozen=True)
class CompileConfig:
    """Options of ``dlopt compile`` / ``dlopt.compile``, in sections.

    model: path to an .onnx file or an ``onnx.ModelProto``.
    precision: ``auto`` builds fp32, fp16 and int8 (and mixed int8/float when int8
        misses the budget; int8-dynamic for MatMul-heavy models) and keeps the fastest
        within the budget; or one precision.
    data, budget, timing, output: what the model is evaluated and calibrated on, the accuracy
        budget and its metric, how candidates are timed, where the output goes.
    tvm, mcu: options only a backend reads (each backend receives only its own section).
    ``CompileConfig.build(model, **options)`` makes one from ``dlopt.compile``'s flat keyword arguments.
    """

    model: Any
    target: str = "cpu"
    targets_file: Path | None = None  # TOML with [targets.NAME] tables [default: ./dlopt.toml]
    precision: str = "auto"
    prune: float | None = None  # zero this fraction of each layer's smallest weights (unstructured)
    data: DataOptions = field(default_factory=DataOptions)
    budget: BudgetOptions = field(default_factory=BudgetOptions)
    timing: TimingOptions = field(default_factory=TimingOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    tvm: TvmOptions = field(default_factory=TvmOptions)
    mcu: McuOptions = field(default_factory=McuOptions)
    source: SourceOptions = field(default_factory=SourceOptions)
    # a function f(stage, done, total), True for the terminal progress bars, or None
    progress: Callable[[str, int, int], None] | bool | None = field(default=None, compare=False)

    @classmethod
    def build(cls, model: Any, **options: Any) -> "CompileConfig":
        """A config from flat options (``runs=50, calib="c.npz"``), each put in its section."""
        top, sections = {}, {name: {} for name in SECTIONS}
        for name, value in options.items():
            if name in SECTION_OF:
                sections[SECTION_OF[name]][name] = value
            elif name in TOP_LEVEL:
                top[name] = value
            else:
                raise TypeError(f"unknown compile option {name!r}")
        return cls(model=model, **top, **{name: SECTIONS[name](**values) for name, values in sections.items()})

    def with_options(self, **options: Any) -> "CompileConfig":
        """This config with some flat options replaced (``with_options(search_time=10)``)."""
        top = {name: options.pop(name) for name in list(options) if name in TOP_LEVEL}
        changed = {}
        for name, value in options.items():
            if name not in SECTION_OF:
                raise TypeError(f"unknown compile option {name!r}")
            section = SECTION_OF[name]
            changed.setdefault(section, {})[name] = value
        return replace(self, **top, **{s: replace(getattr(self, s), **values) for s, values in changed.items()})

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_types(self)
        data, timing, tvm = self.data, self.timing, self.tvm
        if self.precision not in PRECISIONS or self.precision == "int4":
            if self.precision == "int4":
                raise ConfigError("int4 is weight-only quantisation of a decoder: compile it with --task "
                                  "text-generation (dlopt.llm.compile)")
            raise ConfigError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if data.calib_method not in CALIB_METHODS:
            raise ConfigError(f"unknown calibration method {data.calib_method!r}; choose from {', '.join(CALIB_METHODS)}")
        for name, value in (("samples", data.samples), ("runs", timing.runs), ("calib_samples", data.calib_samples)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if timing.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {timing.warmup}")
        if not (math.isfinite(timing.reference_timeout_s) and timing.reference_timeout_s > 0):
            raise ConfigError(f"reference timeout must be a finite number of seconds above 0 (--reference-timeout), "
                              f"got {timing.reference_timeout_s}")
        if not (math.isfinite(timing.timing_budget_s) and timing.timing_budget_s > 0):
            raise ConfigError(f"timing budget must be a finite number of seconds above 0 (--timing-budget), "
                              f"got {timing.timing_budget_s}")
        if timing.threads is not None:
            cores = machine_cores()
            if not 1 <= timing.threads <= cores:
                raise ConfigError(f"threads must be between 1 and this machine's {cores} cores, got {timing.threads}")
        else:
            default_threads()  # a bad $DLOPT_THREADS is refused here, before any work
        for name, value in (("max_ram", self.mcu.max_ram), ("max_flash", self.mcu.max_flash)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} is a number of bytes, at least 1, got {value}")
        if self.prune is not None and not 0 < self.prune < 1:
            raise ConfigError(f"--prune is the fraction of each layer's weights to zero, between 0 and 1 "
                              f"(exclusive), got {self.prune}")
        for name, value in (("max_accuracy_drop", self.budget.max_accuracy_drop),
                            ("search_time", self.budget.search_time), ("wait", self.output.wait)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be a finite number, 0 or more, got {value}")
        if self.source.torch_module is not None and self.source.example is None:
            raise ConfigError("a PyTorch module needs its example input: dlopt.compile(module, example=tensor_or_tuple)")
        if (tvm.rpc_tracker is None) != (tvm.rpc_key is None):
            raise ConfigError("--rpc-tracker and --rpc-key go together: the tracker and the key of the device's servers")
        if tvm.rpc_tracker is not None:
            tvm.remote  # noqa: B018 - parse now: a bad HOST:PORT or key is a one-line error before any work
        if self.progress is True:  # the API's shorthand for the CLI's terminal progress
            from dlopt.core.progress import TerminalProgress

            object.__setattr__(self, "progress", TerminalProgress())
        elif self.progress is False:
            object.__setattr__(self, "progress", None)

    def output_dir(self, model_name: str) -> Path:
        """``out``, or ``<model>-<target>`` in the working folder (a plain name, whatever the model calls itself)."""
        out = self.output.out
        return Path(out) if out is not None else Path(plain_name(f"{model_name}-{self.target}"))


TOP_LEVEL = ("target", "targets_file", "precision", "prune", "progress")  # the options outside a section


def plain_name(text: str, limit: int = 100) -> str:
    """``text`` as a harmless file name: no separators, no leading dot, no ``..``."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).lstrip("._-")[:limit]
    return name if name.strip(".") else "model"


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Read once, at import: a runtime may later pin the calling thread to one core (TVM's thread pool does),
# and the machine's cores must not shrink with it.
_CORES = _affinity()


def machine_cores() -> int:
    return _CORES


def default_threads() -> int:
    """Threads a build or timing uses when none are given: ``$DLOPT_THREADS`` where it is set, else every core.

    A CI machine that runs several compiles side by side sets ``DLOPT_THREADS=1``: each runtime's threads spin
    while they wait, so two 2-thread timings on 2 busy cores burn CPU the other job needs.  A value that is not
    a whole number between 1 and this machine's cores is a ConfigError naming the variable.
    """
    text = os.environ.get("DLOPT_THREADS", "").strip()
    if not text:
        return _CORES
    if not text.isdecimal() or not 1 <= int(text) <= _CORES:
        raise ConfigError(f"DLOPT_THREADS must be a whole number between 1 and this machine's {_CORES} cores, "
                          f"got {text[:40]!r}")
    return int(text)


# field -> (accepted types, what to say); checked before any value is used so a wrong type is
# a one-line ConfigError, not a TypeError from deep inside.
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "target": ((str,), "a target name"),
    "out": ((str, os.PathLike, type(None)), "a folder path"),
    "precision": ((str,), "a precision name"),
    "samples": ((numbers.Integral, type(None)), "an integer or None"),
    "runs": ((numbers.Integral,), "an integer"),
    "warmup": ((numbers.Integral,), "an integer"),
    "timing_budget_s": ((numbers.Real,), "a number of seconds"),
    "reference_timeout_s": ((numbers.Real,), "a number of seconds"),
    "threads": ((numbers.Integral, type(None)), "an integer or None"),
    "batch": ((numbers.Integral, type(None)), "an integer or None"),
    "shapes": ((Mapping, type(None)), "a dict of input name -> shape"),
    "constants": ((Mapping, type(None)), "a dict of input name -> number or array"),
    "mask_input": ((str, bool, type(None)), "an input name, False or None"),
    "seed": ((numbers.Integral,), "an integer"),
    "calib_samples": ((numbers.Integral,), "an integer"),
    "calib_method": ((str,), "a method name"),
    "max_accuracy_drop": ((numbers.Real,), "a number"),
    "search_time": ((numbers.Real,), "a number of seconds"),
    "cache": ((bool,), "True or False"),
    "wait": ((numbers.Real,), "a number of seconds"),
    "targets_file": ((str, os.PathLike, type(None)), "a file path"),
    "rpc_tracker": ((str, type(None)), "HOST:PORT"),
    "rpc_key": ((str, type(None)), "a device key"),
    "tuning_db": ((str, os.PathLike, bool, type(None)), "a folder, False or None"),
    "prune": ((numbers.Real, type(None)), "a fraction or None"),
    "max_ram": ((numbers.Integral, type(None)), "a number of bytes or None"),
    "max_flash": ((numbers.Integral, type(None)), "a number of bytes or None"),
}


def _check_types(config: CompileConfig) -> None:
    values = {name: getattr(config, name) for name in TOP_LEVEL}
    for section in SECTIONS:
        values.update(vars(getattr(config, section)))
    for name, (types, what) in _TYPES.items():
        value = values[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}")
    metric, batch, shapes, mask_input = values["metric"], values["batch"], values["shapes"], values["mask_input"]
    if metric is not None and not callable(metric) and not isinstance(metric, str):
        raise ConfigError("metric must be top1, cosine, rel-error, 'module:function' or a function "
                          "f(outputs, labels) -> float")
    if batch is not None and batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    for name, shape in (shapes or {}).items():
        if not isinstance(name, str) or not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ConfigError(f"shapes must map input names to tuples of positive integers, got {name!r}: {shape!r}")
    if mask_input is True:
        raise ConfigError("mask_input takes the name of the mask input, False for none, or None to detect it")
    if config.progress not in (None, True, False) and not callable(config.progress):
        raise ConfigError("progress must be True, False, None or a function f(stage, done, total)")
