"""CompileConfig: everything one compile needs, checked before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dlopt.errors import ConfigError

PRECISIONS_IMPLEMENTED = ("fp32",)


@dataclass(frozen=True)
class CompileConfig:
    """Options of ``dlopt compile`` / ``dlopt.compile``.

    model: path to an .onnx file or an ``onnx.ModelProto``.
    inputs: .npz of evaluation feeds (one array per input, first axis = samples,
        optional ``labels`` for top-1 accuracy); random feeds when None.
    samples: number of random feeds compared against the original.
    runs / warmup: latency measurement per model.
    threads: intra-op threads for every runtime (default: all cores).
    """

    model: Any
    target: str = "cpu"
    out: Path | None = None
    precision: str = "fp32"
    inputs: Path | None = None
    samples: int = 20
    runs: int = 100
    warmup: int = 10
    threads: int | None = None
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS_IMPLEMENTED:
            raise ConfigError(
                f"precision {self.precision!r} is not available yet; choose from {', '.join(PRECISIONS_IMPLEMENTED)}"
            )
        for name in ("samples", "runs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be 0 or more, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1

    def output_dir(self, model_name: str) -> Path:
        return Path(self.out) if self.out is not None else Path(f"{model_name}-{self.target}")
