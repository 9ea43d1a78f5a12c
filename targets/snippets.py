"""Helpers for the code and install lines each backend writes into an output's README.md.

Values come from settings files of a folder that may come from elsewhere: a version, dtype or
enum name enters a line only when it has the shape of one, and input names enter code as
Python literals (``repr``)."""

from __future__ import annotations

import re

from dlopt.core.inputs import MASK_NAME

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_DTYPE = re.compile(r"[a-z][a-z0-9_]*")


def version(value) -> str | None:
    """``value`` when it reads as a package version, else None."""
    return value if isinstance(value, str) and _VERSION.fullmatch(value) else None


def dtype(name) -> str:
    """``name`` when it reads as a numpy dtype name, else float32."""
    return name if isinstance(name, str) and _DTYPE.fullmatch(name) else "float32"


def feeds_literal(inputs: list[tuple[str, str, list[int]]]) -> str:
    """Zeros, and ones for a mask as the compile feeds (a mask of zeros hides every token: NaN from the softmax)."""
    return "{" + ", ".join(f"{name!r}: np.{'ones' if MASK_NAME.search(name) else 'zeros'}({tuple(shape)!r}, {dtype!r})"
                           for name, dtype, shape in inputs) + "}"
