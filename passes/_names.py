"""Fresh names for what a pass adds to a graph."""

from __future__ import annotations


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base2``, ``base3``, ... : the first not in ``taken``."""
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}{k}"
    return name
