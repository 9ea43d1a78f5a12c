"""Optional dependencies: the one guard that says which extra to install when one is missing."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Iterator

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


@contextlib.contextmanager
def hidden(module: str) -> Iterator[None]:
    """In the block, ``import <module>`` raises ImportError, unless someone has imported it already.

    For libraries that import an optional neighbour whenever it is installed and cope without it: nncf and
    TVM's tvm_ffi import torch (1.4 to 1.8 CPU-s of a fresh process here) to handle torch models or tensors,
    which dlopt never gives them for an ONNX model.  Where ``module`` is imported already (a Python API caller
    with a torch module) nothing is hidden; afterwards it imports as usual.  The hiding is process-wide for
    the block, so it is for imports and calls made from one thread at a time.
    """
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # ``import module`` raises ImportError, which these libraries expect when absent
    try:
        yield
    finally:
        if module in sys.modules and sys.modules[module] is None:
            del sys.modules[module]


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's own thread count at ``threads`` in the block (None: as it is), then as it was, on error too.

    torch defaults to every core; the exports, calibrations and lowerings inside a build use the threads the
    runtimes get instead, since on a busy machine a small model's extra torch threads only spin.
    """
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
