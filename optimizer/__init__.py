"""dlopt: take a trained model to fast, verified artefacts for each target.

The public API is imported lazily so ``import dlopt`` (and ``dlopt --help``)
stays fast: ONNX, ONNX Runtime and torch load only when a function needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["compile", "export", "load", "prune", "distill", "compress", "load_module", "CompileConfig", "Report",
           "errors", "__version__"]

_LAZY = {
    "compile": ("dlopt.api", "compile"),
    "export": ("dlopt.compression.exporter", "export"),
    "load": ("dlopt.llm.generator", "load"),
    "prune": ("dlopt.compression.pruning", "prune"),
    "distill": ("dlopt.compression.distillation", "distill"),
    "compress": ("dlopt.compression.compress", "compress"),
    "load_module": ("dlopt.compression.pruning", "load_module"),
    "CompileConfig": ("dlopt.core.config", "CompileConfig"),
    "Report": ("dlopt.report.data", "Report"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "errors":
        import importlib

        return importlib.import_module("dlopt.core.errors")
    raise AttributeError(f"module 'dlopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy names are not in globals() until first use: without this, dir(dlopt) and tab
    # completion show none of the API (PEP 562); help(dlopt) lists what __all__ names
    return sorted(set(__all__) | {name for name in globals() if name.startswith("__")})
