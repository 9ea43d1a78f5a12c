"""Quiet ONNX Runtime's quantisation tools: they print to stdout and warn on the root logger."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator

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
