"""CompileConfig: everything one compile needs, checked before any work starts."""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from dlopt.core.errors import ConfigError
from dlopt.core.remote import RemoteDevice
from dlopt.core.precisions import CHOICES as PRECISIONS

CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")  # activation ranges (dlopt.flow.ranges); auto: dlopt.flow.recipe
RANDOM_SAMPLES = 20  # random feeds compared with the original when there is no evaluation data
EVAL_SAMPLES = 10_000  # evaluation samples read at most unless samples says otherwise


@dataclass(frozen=True)
class CompileConfig:
    """Options of ``dlopt compile`` / ``dlopt.compile``.

    model: path to an .onnx file or an ``onnx.ModelProto``.
    precision: ``auto`` builds fp32, fp16 and int8 (and mixed int8/float when int8
        misses the budget; int8-dynamic for MatMul-heavy models) and keeps the fastest
        within the budget; or one precision.
    inputs: evaluation data (.npz: one array per input, first axis = samples, optional
        integer ``labels`` for top-1 accuracy); random feeds when None.
    calib: calibration data for int8 (.npz, image folder, iterable of feed dicts, torch
        DataLoader); ``inputs`` or random feeds when None (the report says so).
    max_accuracy_drop: budget in percentage points of the score (top-1 accuracy with
        labels, else top-1 agreement with the original, else cosine similarity, or
        ``metric``'s value).
    metric: ``f(first_outputs, labels_or_None) -> float in [0, 1]``, higher is better.
    search_time: seconds the mixed-precision search may take; the best model found by
        then is kept.
    rpc_tracker, rpc_key: a TVM RPC tracker ("HOST:PORT") and the key of the device's
        servers: TVM candidates for a target that is not this machine are verified and
        timed on that device.
    """

    model: Any
    target: str = "cpu"
    out: Path | None = None
    precision: str = "auto"
    inputs: Any = None
    samples: int | None = None  # random feeds (default 20), or at most this many --eval samples (10000)
    runs: int = 100
    warmup: int = 10
    # seconds the interleaved timing of all candidates may take together; past it each gets fewer runs
    # (never under dlopt.measure.timing.MIN_RUNS) and the report says so; the default is dlopt.measure.timing.TIMING_BUDGET_S
    timing_budget_s: float = 30.0
    # seconds one ONNX Runtime run of the original model may take while its reference outputs are made: a
    # Loop with a huge trip count never ends, and the run is stopped past it (exit 2 naming --reference-timeout)
    reference_timeout_s: float = 600.0
    threads: int | None = None
    seed: int = 0
    calib: Any = None
    calib_samples: int = 256
    calib_method: str = "auto"
    calib_preprocess: Any = None  # dlopt.calibration.ImagePreprocess for image folders
    max_accuracy_drop: float = 1.0
    search_time: float = 120.0
    cache: bool = True  # reuse verified builds from $DLOPT_CACHE (~/.cache/dlopt)
    wait: float = 0.0  # seconds to wait for another compile writing the same output folder
    targets_file: Path | None = None  # TOML with [targets.NAME] tables [default: ./dlopt.toml]
    batch: int | None = None  # timing batch for a symbolic first dim [1]
    shapes: Mapping[str, tuple[int, ...]] | None = None  # declared timing shapes by input name, or one size by dim name
    # inputs the same for every sample (a sample rate): a number (filling the input) or an array, by input name
    constants: Mapping[str, Any] | None = None
    # the attention-mask input whose zeros mark padding the per-token metric skips; None: detect; False: none
    mask_input: str | bool | None = None
    rpc_tracker: str | None = None  # HOST:PORT of a TVM RPC tracker
    rpc_key: str | None = None  # the key its servers for the target device registered with
    # TVM tuning databases: a folder [default: $DLOPT_TUNING_DB or ~/.cache/dlopt/tuning], or False for none
    tuning_db: str | os.PathLike | bool | None = None
    prune: float | None = None  # zero this fraction of each layer's smallest weights (unstructured)
    max_ram: int | None = None  # bytes of RAM a microcontroller build may use (arena + data + stack)
    max_flash: int | None = None  # bytes of flash it may use (code + weights + data)
    # top1 | cosine | rel-error | "module:function" | f(first_outputs, labels) -> float; None: by the outputs
    metric: str | Callable | None = field(default=None, compare=False)
    # a function f(stage, done, total), True for the terminal progress bars, or None
    progress: Callable[[str, int, int], None] | bool | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"unknown calibration method {self.calib_method!r}; choose from {', '.join(CALIB_METHODS)}")
        for name in ("samples", "runs", "calib_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if not (math.isfinite(self.reference_timeout_s) and self.reference_timeout_s > 0):
            raise ConfigError(f"reference timeout must be a finite number of seconds above 0 (--reference-timeout), "
                              f"got {self.reference_timeout_s}")
        if not (math.isfinite(self.timing_budget_s) and self.timing_budget_s > 0):
            raise ConfigError(f"timing budget must be a finite number of seconds above 0 (--timing-budget), "
                              f"got {self.timing_budget_s}")
        if self.threads is not None:
            cores = machine_cores()
            if not 1 <= self.threads <= cores:
                raise ConfigError(f"threads must be between 1 and this machine's {cores} cores, got {self.threads}")
        for name in ("max_ram", "max_flash"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} is a number of bytes, at least 1, got {getattr(self, name)}")
        if self.prune is not None and not 0 < self.prune < 1:
            raise ConfigError(f"--prune is the fraction of each layer's weights to zero, between 0 and 1 "
                              f"(exclusive), got {self.prune}")
        for name in ("max_accuracy_drop", "search_time", "wait"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be a finite number, 0 or more, got {value}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise ConfigError("--rpc-tracker and --rpc-key go together: the tracker and the key of the device's servers")
        if self.rpc_tracker is not None:
            self.remote  # noqa: B018 - parse now: a bad HOST:PORT or key is a one-line error before any work
        if self.progress is True:  # the API's shorthand for the CLI's terminal progress
            from dlopt.core.progress import TerminalProgress

            object.__setattr__(self, "progress", TerminalProgress())
        elif self.progress is False:
            object.__setattr__(self, "progress", None)

    @property
    def remote(self):
        """The RemoteDevice of ``rpc_tracker``/``rpc_key``, or None."""
        if self.rpc_tracker is None:
            return None
        return RemoteDevice.parse(self.rpc_tracker, self.rpc_key)

    @property
    def random_samples(self) -> int:
        return self.samples or RANDOM_SAMPLES

    @property
    def eval_limit(self) -> int:
        """Evaluation samples read at most: evaluation data is held in memory, so it is capped."""
        return self.samples or EVAL_SAMPLES

    @property
    def thread_count(self) -> int:
        return int(self.threads or machine_cores())

    def output_dir(self, model_name: str) -> Path:
        """``out``, or ``<model>-<target>`` in the working folder (a plain name, whatever the model calls itself)."""
        return Path(self.out) if self.out is not None else Path(plain_name(f"{model_name}-{self.target}"))


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
    for name, (types, what) in _TYPES.items():
        value = getattr(config, name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}")
    if config.metric is not None and not callable(config.metric) and not isinstance(config.metric, str):
        raise ConfigError("metric must be top1, cosine, rel-error, 'module:function' or a function "
                          "f(outputs, labels) -> float")
    if config.batch is not None and config.batch < 1:
        raise ConfigError(f"batch must be at least 1, got {config.batch}")
    for name, shape in (config.shapes or {}).items():
        if not isinstance(name, str) or not isinstance(shape, (tuple, list)) or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ConfigError(f"shapes must map input names to tuples of positive integers, got {name!r}: {shape!r}")
    if config.mask_input is True:
        raise ConfigError("mask_input takes the name of the mask input, False for none, or None to detect it")
    if config.progress not in (None, True, False) and not callable(config.progress):
        raise ConfigError("progress must be True, False, None or a function f(stage, done, total)")
