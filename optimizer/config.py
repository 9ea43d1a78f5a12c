"""CompileConfig: everything one compile needs, checked before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dlopt.errors import ConfigError

PRECISIONS = ("auto", "fp32", "fp16", "int8", "int8-dynamic")
CALIB_METHODS = ("minmax", "entropy", "percentile")


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
    """

    model: Any
    target: str = "cpu"
    out: Path | None = None
    precision: str = "auto"
    inputs: Any = None
    samples: int = 20
    runs: int = 100
    warmup: int = 10
    threads: int | None = None
    seed: int = 0
    calib: Any = None
    calib_samples: int = 256
    calib_method: str = "minmax"
    calib_preprocess: Any = None  # dlopt.calibration.ImagePreprocess for image folders
    max_accuracy_drop: float = 1.0
    search_time: float = 300.0
    cache: bool = True  # reuse verified builds from $DLOPT_CACHE (~/.cache/dlopt)
    wait: float = 0.0  # seconds to wait for another compile writing the same output folder
    targets_file: Path | None = None  # TOML with [targets.NAME] tables [default: ./dlopt.toml]
    metric: Callable | None = field(default=None, compare=False)
    progress: Callable[[str, int, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.calib_method not in CALIB_METHODS:
            raise ConfigError(f"unknown calibration method {self.calib_method!r}; choose from {', '.join(CALIB_METHODS)}")
        for name in ("samples", "runs", "calib_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")
        if not self.max_accuracy_drop >= 0:
            raise ConfigError(f"max accuracy drop must be 0 or more points, got {self.max_accuracy_drop}")
        if not self.search_time >= 0:
            raise ConfigError(f"search time must be 0 or more seconds, got {self.search_time}")
        if self.metric is not None and not callable(self.metric):
            raise ConfigError("metric must be a function f(outputs, labels) -> float")

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1

    def output_dir(self, model_name: str) -> Path:
        return Path(self.out) if self.out is not None else Path(f"{model_name}-{self.target}")
