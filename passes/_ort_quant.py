"""ONNX Runtime's quantisers, run quietly (they print to stdout and warn on the root logger) and
through the file they insist on writing."""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import onnx

from dlopt.core.errors import CompileError, first_line

logger = logging.getLogger("dlopt.quantization")


class _DropPreprocessAdvice(logging.Filter):
    # ORT's quantisation tools warn on the root logger (advice to run its pre-processing
    # script, which dlopt's passes replace, and per-tensor notes): keep them as debug logs.
    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname and record.name == "root":
            logger.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Route ORT's prints to debug logging and drop its pre-processing advice."""
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    handlers = list(root.handlers)
    for handler in handlers:
        handler.addFilter(advice)
    root.addFilter(advice)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        root.removeFilter(advice)
        for handler in handlers:
            handler.removeFilter(advice)
        if buffer.getvalue().strip():
            logger.debug("onnxruntime.quantization: %s", buffer.getvalue().strip())


def quantise_to_proto(quantise: Callable[[Path], None], what: str) -> onnx.ModelProto:
    """The model ``quantise(path)`` writes (ORT's quantisers only write files), run quietly in a
    temporary folder of its own and loaded back; any failure is CompileError ``<what> failed: <why>``."""
    with tempfile.TemporaryDirectory(prefix="dlopt-quant-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            with quiet():
                quantise(out)
        except Exception as exc:
            raise CompileError(f"{what} failed: {first_line(exc)}") from exc
        return onnx.load(out)
