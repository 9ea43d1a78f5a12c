"""Optional dependencies: the one guard that says which extra to install when one is missing."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dlopt.core.errors import TargetUnavailable


def require(module: str, extra: str, needs: str, *, load: bool = True) -> ModuleType | None:
    """``module`` imported (or, with ``load=False``, only found installed, for a check before any
    work); TargetUnavailable ``<needs>: pip install 'dlopt[<extra>]'`` when it is missing, where
    ``needs`` says what wanted it (``"--ray needs Ray"``)."""
    message = f"{needs}: pip install 'dlopt[{extra}]'"
    if not load:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            raise TargetUnavailable(message)
        return None
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TargetUnavailable(message) from exc
