"""The one error hierarchy of dlopt.

Every error a user can cause or meet maps to one exit code, and its message says
what was wrong and what to do.  The CLI prints ``str(error)`` on one line; nothing
else crosses that boundary.
"""

from __future__ import annotations


class DloptError(Exception):
    """Base class: anything dlopt raises on purpose."""

    exit_code = 2


class ModelError(DloptError):
    """The input model cannot be read, parsed or validated."""


class ConfigError(DloptError):
    """Options, target names or data files do not make sense together."""


class DataError(ConfigError):
    """Input, calibration or evaluation data does not match the model."""


class OutputBusy(DloptError):
    """Another dlopt process holds the lock on the output folder."""


class TargetUnavailable(DloptError):
    """A target or backend is not usable on this machine (missing package, no device)."""


class CompileError(DloptError):
    """A pass or backend failed on a model that was valid when it came in."""

    exit_code = 3


class AccuracyBudgetExceeded(DloptError):
    """No candidate met the accuracy budget."""

    exit_code = 1


class GateFailed(DloptError):
    """A CI gate threshold was crossed."""

    exit_code = 1


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The gist of an exception's message on one line (a line ending in ':' takes the next one)."""
    lines = [line.strip() for line in (str(exc).strip() or type(exc).__name__).splitlines() if line.strip()]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
