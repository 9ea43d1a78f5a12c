"""The Python API: ``dlopt.compile`` for export scripts and notebooks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dlopt.config import CompileConfig
from dlopt.report import Report


def compile(  # noqa: A001 - mirrors the CLI verb
    model: Any,
    target: str = "cpu",
    out: str | Path | None = None,
    **options: Any,
) -> Report:
    """Optimise ``model`` (an .onnx path or ``onnx.ModelProto``) for ``target``.

    Writes the artefact folder ``out`` (model, session settings, manifest.json,
    report.json, report.md) atomically and returns the :class:`Report`.
    ``options`` are the fields of :class:`dlopt.CompileConfig` (precision, inputs,
    samples, runs, warmup, threads, seed, progress: a function or True for progress
    bars on a terminal).  ``model`` may also be serialised ONNX bytes, and ``inputs`` a
    dict of arrays or an iterable of feed dicts instead of an .npz path.  Raises
    :class:`dlopt.errors.DloptError` subclasses on bad input.
    """
    import dataclasses

    from dlopt.driver import compile as run
    from dlopt.errors import ConfigError

    known = {f.name for f in dataclasses.fields(CompileConfig)} - {"model", "target", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(model, (str, os.PathLike)):
        model = Path(model)
    inputs = options.pop("inputs", None)
    if isinstance(out, (str, os.PathLike)):
        out = Path(out)
    config = CompileConfig(
        model=model, target=target, out=out,
        # a path names an .npz; a dict of arrays, an iterable of feeds or a DataLoader is data itself
        inputs=Path(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs, **options,
    )
    return run(config)

