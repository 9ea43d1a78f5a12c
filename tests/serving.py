"""Shared by the serving tests: whether a Triton server can start here, and SIGTERM in the middle of a load."""

from __future__ import annotations

import signal
import threading
import time
from typing import Callable

from dlopt.core.errors import TargetUnavailable


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
