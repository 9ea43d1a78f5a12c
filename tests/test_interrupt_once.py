"""One signal, one KeyboardInterrupt: the interrupt a build check raised is not raised again by the handler.

A signal that arrives while the main thread is inside native code is seen first by the watcher thread
(dlopt.core.progress), and the compile's own check (``raise_if_interrupted``) raises the
KeyboardInterrupt; Python runs the signal handler only later, when the native call returns.  That late
handler must not raise a second KeyboardInterrupt into the cleanup, or after it (it printed a traceback
under "dlopt: interrupted; nothing was written" on a loaded machine).
"""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
import os, signal, time
from dlopt.core import progress

progress.install_interrupt_handlers()
progress._received.append(signal.SIGTERM)  # what the watcher records while the main thread is in native code
try:
    progress.raise_if_interrupted()
except KeyboardInterrupt:
    print("raised once", flush=True)
os.kill(os.getpid(), signal.SIGTERM)  # the handler Python runs late, when the native call returned
time.sleep(0.2)
print("cleanup done", flush=True)
"""


def test_the_late_handler_of_an_interrupt_already_raised_raises_nothing():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["raised once", "cleanup done"], done.stderr
    assert "KeyboardInterrupt" not in done.stderr and done.returncode == 0


IN_IMPORT = r"""
import signal, sys
from dlopt.core import progress

# a frame of importlib's own code, where a signal can land between taking the import lock and the try
# that releases it (a module lock's weakref callback): raising there leaks the lock and hangs the process
namespace = {"sys": sys}
exec(compile("frame = sys._getframe()", "<frozen importlib._bootstrap>", "exec"), namespace)
progress._on_signal(signal.SIGTERM, namespace["frame"])
print("no raise inside the import machinery", progress.interrupted() == signal.SIGTERM, flush=True)
import json  # imports still work
try:
    progress.raise_if_interrupted()
except KeyboardInterrupt:
    print("raised at the next check", flush=True)
"""


def test_a_signal_inside_the_import_machinery_is_raised_at_the_next_check_not_there():
    done = subprocess.run([sys.executable, "-c", IN_IMPORT], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["no raise inside the import machinery True", "raised at the next check"], \
        done.stderr
    assert done.returncode == 0
