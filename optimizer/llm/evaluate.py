"""How well a decoder predicts text (perplexity over fixed windows) and how closely its greedy output
follows another's (greedy agreement).

Perplexity follows the fixed-window recipe of huggingface.co/docs/transformers/perplexity: windows of
``window`` tokens start every ``stride`` tokens, each runs from an empty past, and each scores only the
targets no earlier window scored (all of the first window's, then the last ``stride`` of each), so every
token after the first is scored exactly once, with at least ``window - stride`` tokens of context after
the first window.  Log-probabilities are taken in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from dlopt.core.errors import ConfigError, DataError


# Rows of logits taken to float64 at once: a 512-token window of a 49k vocabulary is 200 MB in float64, and its
# exp another 200 MB; 64 rows at a time keep that to 25 MB each.
_ROWS = 64


@dataclass(frozen=True)
class Perplexity:
    """exp(mean negative log-likelihood) over ``tokens`` scored targets."""

    perplexity: float
    tokens: int
    window: int
    stride: int
    nll: float  # summed over the scored targets, in nats


@dataclass(frozen=True)
class Agreement:
    """Greedy agreement of a candidate with a reference, over ``prompts`` prompts."""

    prefix: float  # mean fraction of each reference continuation the candidate matches from its start
    exact: int     # continuations matched token for token
    prompts: int


def perplexity(model: Any, token_ids: Sequence[int], *, window: int = 512, stride: int = 256) -> Perplexity:
    """Perplexity of ``token_ids`` under ``model``: a ``DecoderSession`` (its ``prefill``) or any function
    from a window's token ids to its logits [len(ids), vocab]."""
    logits_of: Callable = model.prefill if hasattr(model, "prefill") else model
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or len(ids) < 2 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"perplexity needs at least 2 token ids in one sequence, not an array of shape "
                        f"{list(ids.shape)} and type {ids.dtype}")
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"perplexity windows of {window} tokens every {stride}: the window must be 2 or more "
                          "and the stride between 1 and the window")
    nll, scored, end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        first, stop = max(end, begin + 1), min(begin + window, len(ids))
        logits = np.asarray(logits_of(ids[begin:stop]))
        if logits.shape[0] != stop - begin:
            raise DataError(f"the model gave logits for {logits.shape[0]} positions of a {stop - begin}-token window")
        for row in range(first, stop, _ROWS):  # row t-1 predicts token t; float64 a block of rows at a time
            rows = logits[row - begin - 1:min(row + _ROWS, stop) - begin - 1].astype(np.float64)
            peak = rows.max(axis=1, keepdims=True)
            log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
            nll += float((log_norm - rows[np.arange(len(rows)), ids[row:row + len(rows)]]).sum())
        scored += stop - first
        end = stop
        if stop == len(ids):
            break
    return Perplexity(math.exp(nll / scored), scored, window, stride, nll)


def greedy_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> Agreement:
    """How far each candidate continuation matches the reference's for the same prompt, from the first token:
    the mean matched-prefix fraction of the reference's length, and how many match exactly."""
    if len(reference) != len(candidate) or not reference:
        raise DataError(f"greedy agreement compares continuations prompt by prompt: {len(reference)} reference and "
                        f"{len(candidate)} candidate continuations")
    fractions, exact = [], 0
    for want, got in zip(reference, candidate):
        want, got = list(want), list(got)
        if not want:
            raise DataError("greedy agreement needs a non-empty reference continuation for every prompt")
        matched = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        fractions.append(matched / len(want))
        exact += want == got
    return Agreement(float(np.mean(fractions)), exact, len(reference))
