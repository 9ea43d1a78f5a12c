"""The one registry of precisions: what each means, what it needs and how it ranks.

Every other module asks this table instead of keeping its own list of names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    rank: int  # simplicity: on a tie in speed the lowest rank ships (less accuracy risk)
    calibrated: bool = False  # needs activation ranges from calibration data
    user_choice: bool = True  # may be asked for with --precision
    auto: bool = False  # built by --precision auto on every target that offers it
    graph_change: bool = True  # False: a runtime setting of the backend (bf16 on OpenVINO)
    quantised: bool = False  # integer arithmetic: its artefact ships the calibration table


REGISTRY: dict[str, Precision] = {p.name: p for p in (
    Precision("original", -1, user_choice=False, graph_change=False),  # the input model, unchanged
    Precision("fp32", 0, auto=True),
    Precision("bf16", 1, user_choice=False, graph_change=False),
    Precision("fp16", 2, auto=True),
    Precision("int8-dynamic", 3, quantised=True),
    Precision("mixed", 4, calibrated=True, user_choice=False, quantised=True),
    Precision("int8", 5, calibrated=True, auto=True, quantised=True),
    # weight-only INT4 blocks (MatMulNBits, NNCF's compress_weights): `--task text-generation` only
    Precision("int4", 6),
)}

# For --precision: "auto" plus every precision a user may ask for by name.
CHOICES = ("auto", *(p.name for p in REGISTRY.values() if p.user_choice))
# Where latency cannot be measured here, the precision usually fastest on devices goes first.
UNTIMED_PREFERENCE = tuple(sorted((n for n in REGISTRY if n != "original"), key=lambda n: -REGISTRY[n].rank))


def get(name: str) -> Precision:
    return REGISTRY[name]


def rank(name: str) -> int:
    return REGISTRY[name].rank if name in REGISTRY else len(REGISTRY)


class Status(str, enum.Enum):
    """What became of a candidate; a str so it serialises as its value."""

    OK = "ok"
    REJECTED = "rejected"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"
    UNSUPPORTED = "unsupported"

    def __str__(self) -> str:
        return self.value

# How int8 calibration finds activation ranges (dlopt.flow.ranges); auto: as dlopt.flow.recipe decides.
CALIB_METHODS = ("auto", "minmax", "entropy", "percentile")
