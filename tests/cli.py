"""Run the installed ``dlopt`` console script as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DLOPT = str(Path(sys.executable).parent / "dlopt")


def dlopt(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([DLOPT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout)
