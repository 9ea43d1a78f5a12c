"""How closely a candidate's outputs reproduce the original's: numpy only.

It runs inside dlopt and, pasted into a bundle's run_candidates.py, on a device that
has only numpy and a runtime; keep it free of other imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate reproduces the reference outputs, worst case over all feeds."""

    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |reference|, per output
    min_cosine: float
    top1_agreement: float | None  # share of samples whose argmax matches (first output)
    non_finite: str | None = None  # "NaN in output 0 on feed 3" where the reference is finite there

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "dict | Fidelity") -> "Fidelity":
        """From report.json's field (unknown keys ignored; a report may lack the later ones)."""
        if isinstance(data, Fidelity):
            return data
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{"max_abs_error": None, "min_cosine": None, "top1_agreement": None, **values})


def _non_finite(ref: np.ndarray, got: np.ndarray) -> str | None:
    """NaN or Inf in ``got`` where ``ref`` is finite: a broken candidate, whatever else it scores."""
    bad = ~np.isfinite(got) & np.isfinite(ref)
    if not bad.any():
        return None
    return "NaN" if np.isnan(got[bad]).any() else "Inf"


def compare(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> Fidelity:
    """Worst-case agreement of ``candidate`` with ``reference``; NaN never hides in a maximum."""
    max_abs = max_rel = 0.0
    min_cos = 1.0
    agree = total = 0
    for feed, (ref_outs, cand_outs) in enumerate(zip(reference, candidate, strict=True)):
        for index, (ref, got) in enumerate(zip(ref_outs, cand_outs, strict=True)):
            ref64 = np.asarray(ref, dtype=np.float64)
            got64 = np.asarray(got, dtype=np.float64)
            if ref64.shape != got64.shape:
                return Fidelity(float("inf"), float("inf"), -1.0, 0.0)
            kind = _non_finite(ref64, got64)
            if kind is not None:
                return Fidelity(float("inf"), float("inf"), -1.0, 0.0, f"{kind} in output {index} on feed {feed}")
            # where both are non-finite alike (the original itself gives Inf), compare the rest
            same = ~np.isfinite(ref64) & (np.isnan(ref64) & np.isnan(got64) | (ref64 == got64))
            if same.any():
                ref64, got64 = np.where(same, 0.0, ref64), np.where(same, 0.0, got64)
            diff = float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0
            scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else diff)
            a, b = ref64.ravel(), got64.ravel()
            norm = float(np.linalg.norm(a) * np.linalg.norm(b))
            cos = float(np.dot(a, b) / norm) if norm > 0 else float(np.array_equal(a, b))
            min_cos = min(min_cos, cos)
            if index == 0 and ref64.ndim >= 2 and np.issubdtype(np.asarray(ref).dtype, np.floating):
                agree += int(np.sum(ref64.argmax(-1) == got64.argmax(-1)))
                total += int(np.prod(ref64.shape[:-1]))
    return Fidelity(max_abs, max_rel, min_cos, agree / total if total else None)
