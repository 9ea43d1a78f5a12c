"""What every backend module provides, and the artefact it hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass
class Artifact:
    """A compiled candidate on disk: ``folder`` holds ``files`` (names relative to it)."""

    backend: str
    precision: str
    folder: Path
    files: list[str]
    entry: str  # the file a runtime loads (model.onnx, model.xml, lib.so, ...)
    loadable_here: bool = True  # this host can load and run it (timing needs the target itself)
    settings: dict[str, Any] = field(default_factory=dict)  # runtime settings to reproduce it

    @property
    def entry_path(self) -> Path:
        return self.folder / self.entry

    def size_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.files)


class Session(Protocol):
    """A loaded artefact that runs feeds of numpy arrays."""

    input_names: Sequence[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    """One backend module in ``dlopt.targets`` (see ``dlopt.targets.get_backend``)."""

    name: str

    def available(self) -> bool | str:
        """True, or the reason this backend cannot be used on this machine."""

    def supports(self, model) -> list[str]:
        """Ops of ``model`` (an onnx_ir Model) this backend cannot run; empty when all are fine."""

    def passes(self, precision: str) -> list:
        """Backend-specific passes run after the precision passes (instrumented by the driver)."""

    def compile(self, model, profile, workdir: Path, *, precision: str, threads: int) -> Artifact:
        """Write the artefact for ``model`` into ``workdir`` and describe it."""

    def load(self, artifact: Artifact) -> Session:
        """Load an artefact built by ``compile`` for running on this machine."""
