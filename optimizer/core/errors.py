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


# Characters str.splitlines() breaks at besides \n and \r (and other controls): a message keeps them
# escaped, so a file name holding U+2028 neither cuts the line nor hides what follows it.
_ODD_BREAKS = {c: f"\\u{c:04x}" if c > 0xFF else f"\\x{c:02x}"
               for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def one_line(text: str) -> str:
    r"""``text`` on one line: its lines (at \n or \r) joined by spaces, other line breaks and controls escaped."""
    lines = str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return " ".join(line.strip().translate(_ODD_BREAKS) for line in lines if line.strip())


def first_line(exc: BaseException, limit: int = 300) -> str:
    r"""The gist of an exception's message on one line (a line ending in ':' takes the next one).

    Lines end at \n or \r only; U+2028, U+2029, NEL and other controls inside a line are escaped
    (``\u2028``), never taken as the end of the message."""
    text = str(exc).replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.strip() for line in (text.strip() or type(exc).__name__).split("\n") if line.strip()]
    if not lines:
        lines = [type(exc).__name__]
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    text = text.translate(_ODD_BREAKS)
    return text if len(text) <= limit else text[: limit - 3] + "..."
