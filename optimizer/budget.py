"""The accuracy budget: one score per model, and how far a candidate may fall below the original.

The score is, in order of preference: the user's metric (Python API), top-1
accuracy on labelled data, top-1 agreement with the original's predictions, or
the cosine similarity of the outputs.  Drops are in percentage points of that
score, so ``--max-accuracy-drop 0.5`` reads the same for all four.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dlopt.evaluate import compare, top1_accuracy

# A user metric takes the first output of every feed and the labels (or None) and
# returns a score in [0, 1] where higher is better (accuracy, mAP, F1, ...).
Metric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray] | None], float]


@dataclass(frozen=True)
class Score:
    metric: str
    value: float
    drop_pp: float  # (original - this) * 100; negative when better than the original

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": round(self.value, 6), "drop_pp": round(self.drop_pp, 4)}


class Scorer:
    """Scores outputs against the original model's, with the metric fixed up front."""

    def __init__(self, reference: list[list[np.ndarray]], labels: list[np.ndarray], metric: Metric | None) -> None:
        self.reference = reference
        self.labels = labels
        self.metric = metric
        first = np.asarray(reference[0][0])
        if metric is not None:
            self.name = getattr(metric, "__name__", "metric")
        elif labels:
            self.name = "top-1 accuracy"
        elif first.ndim >= 2 and np.issubdtype(first.dtype, np.floating) and first.shape[-1] > 1:
            self.name = "top-1 agreement"
        else:
            self.name = "cosine similarity"
        self.original = self._value(reference)

    def _value(self, outputs: list[list[np.ndarray]]) -> float:
        firsts = [o[0] for o in outputs]
        if self.metric is not None:
            return float(self.metric(firsts, self.labels or None))
        if self.labels:
            return top1_accuracy(firsts, self.labels)
        fidelity = compare(self.reference, outputs)
        if self.name == "top-1 agreement":
            return float(fidelity.top1_agreement)
        return float(fidelity.min_cosine)

    def score(self, outputs: list[list[np.ndarray]]) -> Score:
        value = self._value(outputs)
        return Score(self.name, value, (self.original - value) * 100.0)
