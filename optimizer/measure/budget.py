"""The accuracy budget: one metric per model, and how far a candidate may fall from the original.

The metric follows what the model outputs, unless the user names one:
- classifier logits ``[N, C]``: top-1 accuracy with labels, else top-1 agreement
  with the original's predictions (rows of unit length that are not probabilities are
  an L2-normalised embedding, not class scores: cosine, below);
- anything else (embeddings, hidden states, regression, detection heads):
  per-sample cosine similarity with the original's outputs, the minimum over
  samples (the mean is reported beside it);
- ``rel-error``: the largest relative error of any output (lower is better);
- a user function ``f(first_outputs, labels_or_None) -> float`` in [0, 1], higher
  better, where ``first_outputs`` is the list of the first output of every
  evaluation batch (one array per batch of up to 32 samples) and ``labels`` the
  matching list of label arrays.
Drops are in points: 100 x the change of the metric, in the direction that is
worse, so ``--max-accuracy-drop 0.5`` allows top-1 to lose half a percent, cosine
to fall by 0.005 or the relative error to grow by 0.005.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from dlopt.core.errors import ConfigError, first_line
from dlopt.measure.evaluate import compare, top1_accuracy

UserMetric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray] | None], float]
BUILTIN = ("top1", "cosine", "rel-error")


@dataclass(frozen=True)
class Score:
    metric: str
    value: float | None  # None only in a record that never had one (a test's, an old report's)
    drop_pp: float  # points (100 x the metric) worse than the original; negative when better
    details: tuple[tuple[str, float], ...] = ()  # e.g. mean cosine beside the minimum

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": _round(self.value, 6), "drop_pp": _round(self.drop_pp, 4),
                **{k: _round(v, 6) for k, v in self.details}}

    def rounded(self) -> "Score":
        """As report.json keeps it (what the candidate is judged and ranked on, so a reread report agrees)."""
        return Score.from_dict(self.to_dict())

    @classmethod
    def from_dict(cls, data: "dict | Score") -> "Score":
        """From report.json's field: metric, value and drop_pp, every other number a detail."""
        if isinstance(data, Score):
            return data
        details = tuple((k, v) for k, v in data.items() if k not in _OWN and isinstance(v, (int, float)))
        return cls(data.get("metric", ""), data.get("value"), data.get("drop_pp"), details)


_OWN = ("metric", "value", "drop_pp")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def looks_like_embedding(array: np.ndarray) -> bool:
    """Rows of unit length that are not probabilities: an L2-normalised embedding (sentence
    encoders, CLIP, face recognition), which top-1 agreement would score as class scores."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or array.shape[-1] < 2 or not np.all(np.isfinite(array)):
        return False
    unit = np.allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-3)
    probabilities = np.all(array >= 0) and np.allclose(array.sum(axis=1), 1.0, atol=1e-3)
    return bool(unit and not probabilities)


def is_classifier_output(array: np.ndarray) -> bool:
    """Logits or probabilities ``[N, C]``: a float matrix with more than one class."""
    array = np.asarray(array)
    return array.ndim == 2 and np.issubdtype(array.dtype, np.floating) and array.shape[-1] > 1


def load_metric(spec: str | UserMetric | None) -> str | UserMetric | None:
    """``top1``/``cosine``/``rel-error``, ``module:function``, a callable, or None for automatic."""
    if spec is None or callable(spec) or spec in BUILTIN:
        return spec
    module, sep, function = str(spec).partition(":")
    if not sep or not module or not function:
        raise ConfigError(f"--metric takes {', '.join(BUILTIN)} or module:function, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module), function)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error at import
        raise ConfigError(f"cannot load metric {spec}: {first_line(exc)}") from exc
    if not callable(found):
        raise ConfigError(f"metric {spec} is not a function")
    return found


def per_sample_cosine(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]],
                      masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Cosine similarity of each sample (first axis) of each float output, flattened per sample.

    With ``masks`` (one ``[batch, seq]`` array per feed, 0 = padding), an output shaped
    ``[batch, seq, ...]`` is compared on each sample's kept tokens only: padding positions
    hold values the model's own mask hides downstream.
    """
    values = []
    for feed, (ref_outs, got_outs) in enumerate(zip(reference, outputs, strict=True)):
        mask = masks[feed] if masks is not None else None
        for ref, got in zip(ref_outs, got_outs, strict=True):
            ref = np.asarray(ref, dtype=np.float64)
            got = np.asarray(got, dtype=np.float64)
            if ref.shape != got.shape:
                return np.array([-1.0])
            if ref.dtype.kind != "f" or ref.size == 0:
                continue
            if mask is not None and ref.ndim >= 2 and ref.shape[:2] == np.shape(mask):
                values.append(_masked_cosine(ref, got, np.asarray(mask) != 0))
                continue
            a = ref.reshape(len(ref), -1) if ref.ndim >= 2 else ref.reshape(1, -1)
            b = got.reshape(a.shape)
            values.append(_cosine_rows(a, b))
    return np.concatenate(values) if values else np.array([1.0])


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    same = np.all(a == b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), same.astype(np.float64))
    return np.nan_to_num(cos, nan=-1.0)


def _masked_cosine(ref: np.ndarray, got: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per-sample cosine over the kept positions of ``[batch, seq, ...]`` outputs (a sample with none kept: 1)."""
    rows = []
    for i in range(len(ref)):
        if not keep[i].any():
            rows.append(1.0)
            continue
        a, b = ref[i][keep[i]].reshape(1, -1), got[i][keep[i]].reshape(1, -1)
        rows.append(float(_cosine_rows(a, b)[0]))
    return np.asarray(rows)


def find_mask_input(specs: Sequence, feeds: Sequence[dict], choice: str | bool | None) -> str | None:
    """The attention-mask input: ``choice`` when named (checked), none when False, else detected.

    Detected: an integer or boolean input of rank 2 named like a mask whose values in the
    evaluation feeds are all 0 or 1 (``attention_mask``; ``input_mask``).
    """
    if choice is False:
        return None
    by_name = {s.name: s for s in specs}
    if isinstance(choice, str):
        spec = by_name.get(choice)
        if spec is None:
            raise ConfigError(f"--mask-input {choice}: the model has no input {choice!r}; its inputs: "
                              f"{', '.join(sorted(by_name))}")
        if spec.dtype.kind not in "iub" or len(spec.shape) != 2:
            raise ConfigError(f"--mask-input {choice}: a mask is an integer or boolean input [batch, seq]; "
                              f"{spec.describe()} is not")
        return choice
    found = [s.name for s in specs if s.dtype.kind in "iub" and len(s.shape) == 2 and "mask" in s.name.lower()
             and all(np.isin(np.asarray(f[s.name]), (0, 1)).all() for f in feeds if s.name in f)]
    found.sort(key=lambda n: (n != "attention_mask", n))
    return found[0] if found else None


class Scorer:
    """Scores outputs against the original model's, with the metric fixed up front."""

    def __init__(self, reference: list[list[np.ndarray]], labels: list[np.ndarray],
                 metric: str | UserMetric | None = None, *, masks: Sequence[np.ndarray] | None = None,
                 mask_name: str | None = None) -> None:
        self.reference = reference
        self.labels = labels
        self.masks = list(masks) if masks is not None and mask_name else None
        self.mask_name = mask_name if self.masks is not None else None
        metric = load_metric(metric)
        first = np.asarray(reference[0][0])
        if callable(metric):
            self.kind, self.name = "user", getattr(metric, "__name__", "metric")
        elif metric == "top1" or (metric is None and is_classifier_output(first)
                                  and (labels or not looks_like_embedding(first))):
            if not is_classifier_output(first):
                raise ConfigError(f"metric top1 needs classifier outputs [N, C]; the first output has shape "
                                  f"{first.shape}")
            self.kind = "top1"
            self.name = "top-1 accuracy" if labels else "top-1 agreement"
        elif metric == "rel-error":
            self.kind, self.name = "rel-error", "max relative error"
        else:
            self.kind, self.name = "cosine", "cosine similarity (min per sample)"
            padded = self.masks is not None and not all(np.all(np.asarray(m) != 0) for m in self.masks)
            if padded and any(np.ndim(o) >= 2 and np.shape(o)[:2] == np.shape(self.masks[0]) for o in reference[0]):
                self.name = f"cosine similarity (min per sample, over unmasked tokens ({self.mask_name}))"
            else:
                self.masks = self.mask_name = None  # no padding, or no per-token output: nothing to mask
        self.user = metric if callable(metric) else None
        self.higher_is_better = self.kind != "rel-error"
        self.original = self._value(reference)[0]

    @property
    def units(self) -> str:
        if self.kind == "rel-error":
            return "points = 100 x relative error (lower is better)"
        return "points = 100 x the metric" if self.kind != "top1" else "percentage points"

    def _value(self, outputs: list[list[np.ndarray]]) -> tuple[float, tuple[tuple[str, float], ...]]:
        firsts = [o[0] for o in outputs]
        if self.user is not None:
            try:
                value = float(self.user(firsts, self.labels or None))
            except Exception as exc:  # the user's code: say whose it is
                raise ConfigError(f"metric {self.name} failed: {first_line(exc)}") from exc
            return value, ()
        if self.kind == "top1":
            if self.labels:
                return top1_accuracy(firsts, self.labels), ()
            return float(compare(self.reference, outputs).top1_agreement or 0.0), ()
        if self.kind == "rel-error":
            return float(compare(self.reference, outputs).max_rel_error), ()
        cos = per_sample_cosine(self.reference, outputs, self.masks)
        return float(cos.min()), (("mean_cosine", float(cos.mean())),)

    def score(self, outputs: list[list[np.ndarray]]) -> Score:
        value, details = self._value(outputs)
        drop = (self.original - value) if self.higher_is_better else (value - self.original)
        return Score(self.name, value, drop * 100.0, details)
