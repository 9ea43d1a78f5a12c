"""The Python API: ``dlopt.compile`` for export scripts and notebooks."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from dlopt.compression.exporter import export
from dlopt.core.config import SECTION_OF, TOP_LEVEL, CompileConfig, plain_name
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
    """Optimise ``model`` (an .onnx path, an ``onnx.ModelProto`` or a ``torch.nn.Module``) for ``target``.

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

    A ``torch.nn.Module`` needs ``example=`` (a tensor or a tuple of tensors, at the shape it is timed
    and verified at): it is exported with :func:`dlopt.export` for the ONNX backends, and the backends
    that build from PyTorch itself (ExecuTorch, through ``torch.export``) get the module.  An .onnx
    model may name the module it was exported from the same way: ``torch_module=module, example=x``.
    """
    known = (set(SECTION_OF) | set(TOP_LEVEL)) - {"target", "out"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if isinstance(model, (str, os.PathLike)):
        model = Path(model)
    if _is_torch_module(model):
        with tempfile.TemporaryDirectory(prefix="dlopt-export-") as tmp:
            if options.get("example") is None:
                raise ConfigError("a PyTorch module needs its example input: "
                                  "dlopt.compile(module, example=tensor_or_tuple)")
            onnx_path = export(model, options["example"], Path(tmp) / f"{plain_name(type(model).__name__)}.onnx")
            return compile(onnx_path, target, out, progress=progress, **{**options, "torch_module": model})
    inputs = options.pop("inputs", None)
    if isinstance(out, (str, os.PathLike)):
        out = Path(out)
    config = CompileConfig.build(
        model, target=target, out=out,
        # a path names an .npz; a dict of arrays, an iterable of feeds or a DataLoader is data itself
        inputs=Path(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs, progress=progress, **options,
    )
    return run(config)


def _is_torch_module(model: Any) -> bool:
    """True for a ``torch.nn.Module`` (torch is imported only where one may have been made)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)

