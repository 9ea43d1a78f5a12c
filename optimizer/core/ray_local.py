"""A local Ray on loopback only: ``dlopt sweep --ray`` and ``dlopt serve --ray`` on one machine need nothing
reachable from outside it."""

from __future__ import annotations

import contextlib
from typing import Iterator

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is loopback, as on macOS


@contextlib.contextmanager
def ray_on_loopback(local: bool) -> Iterator[None]:
    """Ray's node address is loopback while a local Ray starts: the flag Ray read from LOOPBACK_ENV
    when imported, set for the block only (the environment variable, set too, reaches Ray's processes)."""
    try:
        from ray._private import ray_constants
        saved = ray_constants.ENABLE_RAY_CLUSTER
    except (ImportError, AttributeError):  # another Ray: the environment variable alone
        yield
        return
    ray_constants.ENABLE_RAY_CLUSTER = saved and not local
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
