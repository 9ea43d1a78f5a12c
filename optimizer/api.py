"""The Python API: ``dlopt.compile`` for export scripts and notebooks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from dlopt.core.config import SECTION_OF, TOP_LEVEL, CompileConfig
from dlopt.core.errors import ConfigError
from dlopt.flow.driver import compile as run
from dlopt.report.data import Report


def compile(  # noqa: A001 - mirrors the CLI verb
    model: Any,
    target: str = "cpu",
    out: str | Path | None = None,
    *,
    progress: Callable[[str, int, int], None] | bool | None = True,
    **options: Any,
) -> Report:
    """Optimise ``model`` (an .onnx path or ``onnx.ModelProto``) for ``target``.

    Writes the artefact folder ``out`` (model, session settings, manifest.json,
    report.json, report.md) atomically and returns the :class:`Report`.
    ``options`` are the fields of :class:`dlopt.CompileConfig` (precision, inputs,
    samples, runs, warmup, threads, seed, ...).  ``model`` may also be serialised ONNX
    bytes, and ``inputs`` a dict of arrays or an iterable of feed dicts instead of an
    .npz path.  Raises :class:`dlopt.core.errors.DloptError` subclasses on bad input.

    ``progress`` is what the compile says on stderr while it runs, as ``dlopt compile``
    does: True (the default) draws a bar per stage on a terminal and, where stderr is
    not one (a CI log, a pipe, a notebook), writes a line such as
    ``dlopt: build tvm/fp32: done [2.8 s]`` for each stage that takes over 2 s;
    False (or None) says nothing, like ``dlopt compile --quiet``; a function
    ``f(stage, done, total)`` receives every step instead.  The standard ``logging``
    silences it too: ``logging.getLogger("dlopt").setLevel(logging.WARNING)``.
    Diagnostics go to the ``"dlopt"`` loggers (``logging.basicConfig(level=logging.INFO)``
    shows them).
    """
    known = (set(SECTION_OF) | set(TOP_LEVEL)) - {"target", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(model, (str, os.PathLike)):
        model = Path(model)
    inputs = options.pop("inputs", None)
    if isinstance(out, (str, os.PathLike)):
        out = Path(out)
    config = CompileConfig.build(
        model, target=target, out=out,
        # a path names an .npz; a dict of arrays, an iterable of feeds or a DataLoader is data itself
        inputs=Path(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs, progress=progress, **options,
    )
    return run(config)

