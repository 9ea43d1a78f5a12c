"""The child processes of a text-generation compile (the export, each build): one way to start them, one way
for them to answer.

A child is ``python -m dlopt.llm.<module> ARGS``; it prints one JSON object as its last stdout line, or exits 2
with ``dlopt: error: …`` as its last stderr line.  It holds its own copy of the weights, so the compile's memory
never holds two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Callable, Sequence

from dlopt.core.errors import CompileError, DloptError, first_line


def run_child(module: str, args: Sequence[str], what: str) -> dict:
    """Run ``python -m module ARGS``; its JSON answer, or CompileError ``"{what} failed: <its last line>"``."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), f"exit {done.returncode}")
        raise CompileError(f"{what} failed: {last.removeprefix('dlopt: error: ')}")
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise CompileError(f"{what}: the child printed no result") from exc


def child_main(work: Callable[[list[str]], dict], argv: list[str]) -> int:
    """A child's ``main``: ``work(argv)``'s answer as JSON on stdout, or its DloptError in one line (exit 2)."""
    try:
        result = work(argv)
    except DloptError as exc:
        print(f"dlopt: error: {first_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
