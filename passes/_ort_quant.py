"""Quiet ONNX Runtime's quantisation tools: they print to stdout and warn on the root logger."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator

logger = logging.getLogger("dlopt.quantization")


class _DropPreprocessAdvice(logging.Filter):
    # ORT advises its own pre-processing script on every call; dlopt's passes do that work.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


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
