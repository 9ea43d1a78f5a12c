"""Shared by the serving tests: whether a Triton server can start here, SIGTERM in the middle of a load, and
``dlopt`` refusing options in this process."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from types import SimpleNamespace
from typing import Callable

from dlopt.core.errors import TargetUnavailable


def dlopt_here(*args) -> tuple[int, str]:
    """(exit status, stderr) of ``dlopt ARGS`` run in this process by click's CliRunner: the same command,
    option checks and error-to-exit-code mapping as the console script, without its 1.3 CPU-seconds of
    start-up.  For refusals that start nothing; the SIGINT/SIGTERM handlers (and wakeup fd) the CLI
    installs are put back afterwards, so this process answers signals as it did."""
    code, _, err = dlopt_here_out(*args)
    return code, err


def dlopt_here_out(*args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``dlopt ARGS`` run in this process, as ``dlopt_here`` (same command,
    exit mapping, signal handlers put back): for ``--json`` runs and printed summaries where the console
    script's own process is not what the test checks."""
    from click.testing import CliRunner

    from dlopt.cli.app import main

    if threading.current_thread() is not threading.main_thread():  # the CLI installs no handlers there
        result = CliRunner().invoke(main, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    try:
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(wakeup)
    return result.exit_code, result.stdout, result.stderr


def dlopt_in(*args, cwd=None) -> SimpleNamespace:
    """``dlopt_here_out`` from ``cwd`` (this process's folder when None), as returncode/stdout/stderr, the
    attributes of tests/cli.py ``dlopt``'s result: a drop-in where the console script's own process is not
    what a test checks (no 1.3 CPU-seconds of start-up)."""
    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        code, out, err = dlopt_here_out(*args)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def triton_missing() -> str | None:
    """Why no Triton server can start here (the wheel, its Python backend, a shared libpython), or None."""
    from dlopt.deploy.serve import TritonInstall

    try:
        TritonInstall.find()
    except TargetUnavailable as exc:
        return str(exc)
    return None


def sigterm_during_load(server, infer_ok: Callable[[object], bool], *, threads: int = 8, sent_first: int = 80):
    """``threads`` clients (``server.client()`` each: tritonclient's HTTP client is not thread-safe) send
    until ``sent_first`` requests were answered, then the server gets SIGTERM; the load stops half a second
    later.  (requests sent before the signal as (sent, ok, error), the server's exit status)."""
    results: list[tuple[float, bool, str]] = []
    stop = threading.Event()

    def load() -> None:
        client = server.client()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                results.append((sent, bool(infer_ok(client)), ""))
            except Exception as exc:  # after the signal, a new request may be refused
                results.append((sent, False, str(exc)[:200]))
        client.close()

    workers = [threading.Thread(target=load) for _ in range(threads)]
    for t in workers:
        t.start()
    deadline = time.monotonic() + 120
    while len(results) < sent_first and time.monotonic() < deadline:
        time.sleep(0.01)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    stop.set()
    for t in workers:
        t.join(120)
    status = server.stop()
    return [r for r in results if r[0] < signalled], status
