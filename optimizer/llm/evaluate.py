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
# Logits values one call may give: a window of a large vocabulary runs as a prefill then extends of the cache, a
# part at a time (the same sums; a 512-token window of Gemma 3's 262k vocabulary is 537 MB of float32 logits,
# more than the model's own weights, and ONNX Runtime holds its MatMul output beside the copy it returns).
MAX_LOGITS = 32 << 20


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


def perplexity(model: Any, token_ids: Sequence[int], *, window: int = 512, stride: int = 256,
               max_logits: int = MAX_LOGITS) -> Perplexity:
    """Perplexity of ``token_ids`` under ``model``: a ``DecoderSession`` (its ``prefill``) or any function
    from a window's token ids to its logits [len(ids), vocab].  A session with ``extend`` and a known ``vocab``
    runs each window in parts of at most ``max_logits`` logits values (at least 16 tokens each)."""
    logits_of: Callable = model.prefill if hasattr(model, "prefill") else model
    vocab = getattr(model, "vocab", None)
    part = max(16, max_logits // vocab) if isinstance(vocab, int) and vocab > 0 and hasattr(model, "extend") \
        else window
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
        for at in range(begin, stop, part):  # the window's positions [at, at + len(logits))
            piece = ids[at:min(at + part, stop)]
            logits = np.asarray(logits_of(piece) if at == begin else model.extend(piece))
            if logits.shape[0] != len(piece):
                raise DataError(f"the model gave logits for {logits.shape[0]} positions of {len(piece)} tokens")
            # the row of position t predicts token t + 1; float64 a block of rows at a time
            for row in range(max(first - 1, at), at + len(piece) - (at + len(piece) == stop), _ROWS):
                rows = logits[row - at:min(row + _ROWS, at + len(piece), stop - 1) - at].astype(np.float64)
                peak = rows.max(axis=1, keepdims=True)
                log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
                nll += float((log_norm - rows[np.arange(len(rows)), ids[row + 1:row + 1 + len(rows)]]).sum())
            del logits
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
