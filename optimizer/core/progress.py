"""Progress of long stages on stderr: bars on a terminal, log lines elsewhere (CI).

A stage reports ``progress(stage, done, total)``; a stage of one step reports
``(0, 1)`` when it starts and ``(1, 1)`` when it ends.  On a terminal each stage gets
a bar redrawn in place.  When stderr is not a terminal, a stage that runs longer
than ``quiet_s`` gets a line every ``interval_s`` while it runs and one when it
ends, so a CI log shows where the time goes without a line per tiny step.
Setting the ``dlopt`` logger (or ``dlopt.core.progress``) above INFO silences it too, so a
program that tunes dlopt's logging with the standard ``logging`` module quiets progress
the same way; the root logger's level (WARNING unless configured) does not count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TextIO


class TerminalProgress:
    """``progress(stage, done, total)`` for the CLI (``progress=True`` in the API)."""

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, interval_s: float = 10.0,
                 quiet_s: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval_s, self.quiet_s = interval_s, quiet_s
        self._started: dict[str, float] = {}
        self._logged: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled or silenced_by_logging():
            return
        if self.tty:
            self._bar(stage, done, total)
            return
        now = time.monotonic()
        started = self._started.setdefault(stage, now)
        if done >= total:
            self._started.pop(stage, None)
            last = self._logged.pop(stage, None)
            if now - started >= self.quiet_s or last is not None:
                self._line(f"{stage}: done ({total} steps)" if total > 1 else f"{stage}: done", now - started)
        elif now - self._logged.get(stage, started) >= self.interval_s:
            self._logged[stage] = now
            self._line(f"{stage}: {done}/{total}" if total > 1 else f"{stage}: running", now - started)

    def _line(self, text: str, seconds: float) -> None:
        self.stream.write(f"dlopt: {text} [{seconds:.1f} s]\n")
        self.stream.flush()

    def _bar(self, stage: str, done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        self.stream.write(f"\r  {stage:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}\x1b[K")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def silenced_by_logging() -> bool:
    """True when a level above INFO was set on ``dlopt.core.progress`` or an ancestor below the root
    (``logging.getLogger("dlopt").setLevel(logging.WARNING)``): the nearest level set decides."""
    logger: logging.Logger | None = logging.getLogger(__name__)
    while logger is not None and logger is not logging.root:
        if logger.level != logging.NOTSET:
            return logger.level > logging.INFO
        logger = logger.parent
    return False


# -- interrupts -------------------------------------------------------------------------------------
# A signal must end a compile with nothing published, whatever code it lands in.  Python runs a
# handler only between bytecodes of the main thread: inside a native build (OpenVINO, NNCF, TVM) it
# waits for the build, and when the build calls back into Python the KeyboardInterrupt it raises can
# come back as an ordinary error (TVM's C++ turns it into a RuntimeError) that a candidate loop counts
# as a failed build.  So the first SIGINT/SIGTERM is also recorded: the compile checks the record at
# every stage boundary (``raise_if_interrupted``), running ONNX Runtime calls are terminated, and a
# watcher thread, woken by the signal itself (``signal.set_wakeup_fd``) even while native code holds
# the main thread, ends the process with exit 130 once ``GRACE_S`` pass (or at a second signal),
# removing the staging folder and the lock first.  It waits while signals are deferred (a publish).

EXIT_INTERRUPTED = 130
GRACE_S = 5.0  # the unwinding of an interrupted compile takes well under a second outside native code
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signal numbers, in order (the watcher's count; the handler's first)
_raised = threading.Event()  # the handler raised its one KeyboardInterrupt
_cleanup: list[Path] = []  # removed before a hard exit: the staging folder, the lock
_cancels: set[Callable[[], None]] = set()  # stop running native calls that can be stopped (ORT runs)
_lock = threading.RLock()  # the handler runs on the main thread, which may hold it


def interrupted() -> int | None:
    """The first SIGINT/SIGTERM this process received since the handlers went in, or None."""
    return _received[0] if _received else None


def raise_if_interrupted(cause: BaseException | None = None) -> None:
    """Raise KeyboardInterrupt when a signal came; call it after every build, evaluation and pass,
    and in every handler that catches a build's errors (``cause``: the error the interrupt became)."""
    if _received:
        _raised.set()  # this is the interrupt's KeyboardInterrupt: the handler, run late, raises no other
        raise KeyboardInterrupt from cause


def install_interrupt_handlers() -> None:
    """The CLI's handlers for SIGINT and SIGTERM (main thread only; once per process)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if getattr(install_interrupt_handlers, "watching", False):
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not allowed here: the handler alone records signals
        os.close(read)
        os.close(write)
        return
    install_interrupt_handlers.watching = True
    threading.Thread(target=_watch, args=(read,), name="dlopt-signals", daemon=True).start()


def _on_signal(signum, frame) -> None:
    with _lock:
        if not _received:  # the watcher may not have seen the byte yet
            _received.append(signum)
    # one KeyboardInterrupt: a second one would cut the cleanup it started short; and none inside the import
    # machinery, where it can land between taking the import lock and the try that releases it (a module
    # lock's weakref callback): Python reports it "ignored", keeps the lock, and the next import hangs
    # forever.  The compile's next check (raise_if_interrupted) raises it instead.
    if not _raised.is_set() and not _in_import(frame):
        _raised.set()
        raise KeyboardInterrupt


def _in_import(frame) -> bool:
    """True when ``frame`` (where a signal landed) is inside importlib's own code."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _watch(fd: int) -> None:
    seen = 0
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for signum in data:
            if signum not in _SIGNALS or signal.getsignal(signum) is not _on_signal:
                continue  # another handler holds it for now (dlopt tune stops its trials itself)
            seen += 1
            with _lock:
                if not _received:
                    _received.append(signum)
            if seen == 1:
                for cancel in list(_cancels):
                    cancel()
                threading.Thread(target=_exit_after, args=(GRACE_S,), name="dlopt-grace", daemon=True).start()
            else:
                _exit_after(0.0)


def _exit_after(seconds: float) -> None:
    """Exit 130 after ``seconds`` (the process normally ends sooner), never inside a deferred section.
    After the first signal only a compile (something to clean up) is ended this way."""
    time.sleep(seconds)
    if seconds and not _cleanup:
        return
    while signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:  # artifacts.signals_deferred: a publish or cleanup
        time.sleep(0.1)
    for path in list(_cleanup):
        for _ in range(3):  # a native build may still be writing into the staging folder
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            if not os.path.lexists(path):
                break
    with contextlib.suppress(OSError):
        os.write(2, b"dlopt: interrupted; nothing was written\n")
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def removed_on_hard_exit(path: Path) -> Iterator[Path]:
    """Within the block, an interrupt that has to end the process at once removes ``path`` first."""
    with _lock:
        _cleanup.append(Path(path))
    try:
        yield Path(path)
    finally:
        with _lock:
            _cleanup.remove(Path(path))


@contextlib.contextmanager
def cancelled_on_interrupt(cancel: Callable[[], None]) -> Iterator[None]:
    """Within the block, a signal calls ``cancel`` (from another thread) to stop a native call."""
    with _lock:
        _cancels.add(cancel)
    try:
        if _received:
            cancel()
        yield
    finally:
        with _lock:
            _cancels.discard(cancel)
