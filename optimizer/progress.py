"""Progress of long stages on stderr: bars on a terminal, log lines elsewhere (CI).

A stage reports ``progress(stage, done, total)``; a stage of one step reports
``(0, 1)`` when it starts and ``(1, 1)`` when it ends.  On a terminal each stage gets
a bar redrawn in place.  When stderr is not a terminal, a stage that runs longer
than ``quiet_s`` gets a line every ``interval_s`` while it runs and one when it
ends, so a CI log shows where the time goes without a line per tiny step.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


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
        if not self.enabled:
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
