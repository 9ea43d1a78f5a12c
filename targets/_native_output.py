"""Native libraries (TVM's C++) write to file descriptor 2: keep it scoped.

``native_output_logged`` sends fd 2 and Python warnings to the caller's debug log for
the block (``dlopt.core.scoped_env.environ`` scopes environment variables).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import tempfile
import traceback
import warnings

logger = logging.getLogger("dlopt.targets.tvm.backend")


@contextlib.contextmanager
def native_output_logged(doing: str):
    """A native library's output during the block goes to the debug log, not the terminal.

    Its C++ logging writes to file descriptor 2 (``BlockBuilder destroyed with
    remaining blocks!`` after a failed conversion, thread-affinity warnings), which
    ``sys.stderr`` cannot intercept, so fd 2 points at a temporary file for the
    block and back afterwards; its frontend's Python warnings are recorded too.
    Anything else writing to fd 2 meanwhile lands in the same debug record.
    """
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _flush_stderr()
        try:
            saved = os.dup(2)
        except OSError:  # no fd 2 at all (a daemon): nothing can reach a terminal anyway
            saved = None
        try:
            if saved is not None:
                os.dup2(sink.fileno(), 2)
            yield
        except BaseException as exc:
            _release_frames(exc)
            raise
        finally:
            _flush_stderr()
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            for w in caught:
                logger.debug("TVM warned while %s: %s: %s", doing, w.category.__name__, w.message)
            if text:
                logger.debug("TVM wrote while %s:\n%s", doing, text)


def _flush_stderr() -> None:
    if sys.stderr is not None:  # None under pythonw
        sys.stderr.flush()


def _release_frames(exc: BaseException) -> None:
    """Free what the failed frames held while fd 2 is still captured.

    A failed conversion leaves a half-built relax.BlockBuilder in the frames of the
    traceback; its destructor logs "BlockBuilder destroyed with remaining blocks!"
    whenever the traceback is freed, long after the block.  Clearing the frames'
    locals (the traceback itself stays, for DLOPT_DEBUG) destroys it here.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()
