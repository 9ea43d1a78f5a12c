"""Progress of long stages on stderr: a bar redrawn in place on a terminal, nothing elsewhere."""

from __future__ import annotations

import sys


class TerminalProgress:
    """``progress(stage, done, total)``: one bar per stage on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r  {stage:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}\x1b[K")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
