"""Exact-match line accuracy of the PP-OCRv4 recogniser, as a dlopt user metric.

    PYTHONPATH=bench DLOPT_OCR_DIR=D dlopt compile D/ocr_rec.onnx --eval D/ocr_eval.npz \\
        --calib D/ocr_calib.npz --metric ocr_metric:exact_match ...

D is the folder bench/real_models.py prepared (default ``$DLOPT_BENCH_DIR`` or
``~/.cache/dlopt-bench``): ``ocr_eval_labels.json`` holds the line strings, and the
eval set's ``labels`` are indices into it (dlopt labels are 1-D integers);
``ocr_dict.txt`` is the model's ``character`` metadata.  Decoding is RapidOCR's:
``["blank"] + dictionary lines + [" "]``, greedy CTC (argmax, collapse repeats,
drop the blank), stripped.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np


def data_dir() -> Path:
    found = os.environ.get("DLOPT_OCR_DIR") or os.environ.get("DLOPT_BENCH_DIR")
    return Path(found) if found else Path.home() / ".cache" / "dlopt-bench"


@functools.lru_cache(maxsize=4)
def _load(d: Path) -> tuple[list[str], list[str]]:
    chars = ["blank"] + (d / "ocr_dict.txt").read_text(encoding="utf-8").splitlines() + [" "]
    return chars, json.loads((d / "ocr_eval_labels.json").read_text())


def decode(probs: np.ndarray, chars: Sequence[str]) -> list[str]:
    """Greedy CTC over ``[N, T, classes]``: one string per line."""
    lines = []
    for row in np.asarray(probs).argmax(-1):
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        lines.append("".join(chars[i] for i in row[keep & (row != 0)]).strip())
    return lines


def exact_match_of(first_outputs: Sequence[np.ndarray], d: Path, labels: Sequence[np.ndarray] | None = None) -> float:
    chars, texts = _load(Path(d))
    predicted = [line for batch in first_outputs for line in decode(batch, chars)]
    # Without labels the batches are the eval set in order.
    indices = np.concatenate([np.asarray(x).ravel() for x in labels]) if labels else np.arange(len(predicted))
    if len(indices) != len(predicted):
        raise ValueError(f"{len(predicted)} decoded lines but {len(indices)} labels")
    return float(np.mean([p == texts[int(i)] for p, i in zip(predicted, indices)])) if predicted else 0.0


def exact_match(first_outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray] | None) -> float:
    """Fraction of evaluation lines read exactly (dlopt's ``module:function`` metric)."""
    return exact_match_of(first_outputs, data_dir(), labels)
