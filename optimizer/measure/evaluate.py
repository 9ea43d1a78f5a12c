"""The comparison of a candidate's outputs with the original's, and time-bounded runs of the original."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from dlopt.core.progress import cancelled_on_interrupt, raise_if_interrupted
from dlopt.measure.fidelity import Fidelity, compare

__all__ = ["FP32_TOLERANCE", "BoundedOrtSession", "Fidelity", "Fp32Check", "RunTimedOut", "compare", "fp32_check",
           "top1_accuracy"]

# The fp32 equivalence rule: an fp32 candidate's largest difference from the original, over the
# output's scale (the larger of its range and its largest magnitude, over every feed), may be at most
# this; more means a pass or backend changed the maths.  Lower precisions answer to the budget.
# Sized from what float reassociation alone gives: the pretrained PP-OCRv4 recogniser (38 Convs,
# attention) 2.2e-4 on ORT and 3.1e-4 on OpenVINO; its 600-node detector's probability map, near zero
# on random inputs, 2.64e-3 on ORT and 1.89e-3 on OpenVINO (max |a - b| / max |reference|, which is
# never below this measure).  A changed op shows far above it: Sigmoid swapped for HardSigmoid at the
# head of a synthetic 603-node residual net (120 Conv blocks, 64x64) measured 7.6e-2 of the output's range.
FP32_TOLERANCE = 1e-2


@dataclass(frozen=True)
class Fp32Check:
    """How far an fp32 candidate is from the original, on the fp32 rule's own measure."""

    error: float  # max |candidate - original| / the output's scale, worst output
    output: int  # the worst output's index

    @property
    def passed(self) -> bool:
        return self.error <= FP32_TOLERANCE

    def refusal(self) -> str:
        """Why the rule refused, naming the rule (empty when it passed)."""
        if self.passed:
            return ""
        return (f"fp32 check: max error {self.error:.1e} of output {self.output}'s range, over the "
                f"{FP32_TOLERANCE:.0e} allowed (float reassociation stays under it: a pass or backend changed "
                f"the maths)")


def fp32_check(reference: Sequence[Sequence[np.ndarray]], outputs: Sequence[Sequence[np.ndarray]]) -> Fp32Check:
    """The fp32 rule's measure: per output, max |a - b| over max(range, max |reference|) across all feeds.

    Scaled to the whole output, not element by element nor feed by feed: reassociated float sums
    differ by a few ulps of the values they add up, which near-zero outputs do not shrink.
    Non-finite values are left to :func:`compare` (a NaN candidate is refused before this rule).
    """
    worst, worst_index = 0.0, 0
    for index in range(min((len(r) for r in reference), default=0)):
        diff, low, high, peak = 0.0, np.inf, -np.inf, 0.0
        for ref_outs, cand_outs in zip(reference, outputs, strict=True):
            ref = np.asarray(ref_outs[index], dtype=np.float64)
            got = np.asarray(cand_outs[index], dtype=np.float64)
            if ref.shape != got.shape:
                return Fp32Check(float("inf"), index)
            both = np.isfinite(ref) & np.isfinite(got)
            if not both.any():
                continue
            r, g = ref[both], got[both]
            diff = max(diff, float(np.max(np.abs(r - g))))
            low, high = min(low, float(r.min())), max(high, float(r.max()))
            peak = max(peak, float(np.max(np.abs(r))))
        scale = max(high - low, peak) if high >= low else 0.0
        error = diff / scale if scale > 0 else diff
        if error > worst:
            worst, worst_index = error, index
    return Fp32Check(worst, worst_index)


def top1_accuracy(outputs: Iterable[np.ndarray], labels: Iterable[np.ndarray]) -> float:
    """Top-1 accuracy of the first output's argmax over the last axis against integer labels."""
    correct = total = 0
    for logits, label in zip(outputs, labels, strict=True):
        pred = np.asarray(logits).reshape(len(label), -1).argmax(-1)
        correct += int(np.sum(pred == np.asarray(label).reshape(-1)))
        total += len(label)
    return correct / total if total else float("nan")


class RunTimedOut(Exception):
    """A run passed its time limit and ONNX Runtime stopped it."""


class BoundedOrtSession:
    """An ONNX Runtime session (``dlopt.targets.ort.OrtSession``) whose every run is stopped after
    ``seconds``, or at once on SIGINT/SIGTERM (``RunOptions.terminate``, which ORT checks before each
    node, a Loop body's included).  A ``Loop`` with a trip count of 2**62 otherwise runs for ever.

    Each run starts a timer thread (about 0.1 ms): for making reference outputs, not for timing.
    """

    def __init__(self, session, seconds: float) -> None:
        self.session, self.seconds = session, seconds
        self.input_names = session.input_names

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # the stop is reported by dlopt, not as a red ORT log line
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            options.terminate = True

        timer = threading.Timer(self.seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            with cancelled_on_interrupt(lambda: setattr(options, "terminate", True)):
                return self.session.run(feeds, options)
        except Exception as exc:
            raise_if_interrupted(exc)
            if expired.is_set():
                raise RunTimedOut(f"stopped after {self.seconds:g} s") from exc
            raise
        finally:
            timer.cancel()
