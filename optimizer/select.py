"""Which candidate ships: the choice policy, in one place, as a function of frozen inputs.

Rules, in order:
1. Only candidates that passed verification and the accuracy budget are eligible.
2. Timed here: a candidate beats another only when the 95% intervals of their
   medians separate and it gains at least ``MIN_GAIN``; the candidates the fastest
   does not beat form a tie, settled by the simpler precision (fp32 > bf16 > fp16 >
   int8-dynamic > mixed > int8), then the target's backend order — and reported
   as a tie.
3. The chosen artefact is never slower than the original: when it does not beat
   the original, the optimised fp32 ships instead (under ``auto``) and the verdict
   says so; when even that is slower, the original model ships unchanged.
4. Not timed here (a device target): the precision usually fastest on devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from dlopt import precisions
from dlopt.precisions import Status
from dlopt.timing import NOISY_CV, Timing, significantly_faster

# A gain smaller than this share of the slower median is within what a shared machine drifts
# between runs: not worth the accuracy risk of a lower precision, nor a flip between compiles.
MIN_GAIN = 0.05
# The key of the input model itself, shipped unchanged when every candidate is slower than it by
# ORIGINAL_MARGIN: a wider margin than between candidates, since swapping back to an unoptimised model
# on a few percent of a tiny model's run-to-run drift would make compiles of it flip between the two.
ORIGINAL = "ort/original"
ORIGINAL_MARGIN = 0.10


@dataclass(frozen=True)
class Entry:
    """What the policy needs to know of one candidate."""

    key: str
    backend: str
    precision: str
    status: Status
    timing: Timing | None = None


@dataclass(frozen=True)
class Verdict:
    chosen: str | None
    why: str
    ties: tuple[str, ...] = ()  # candidates statistically as fast as the chosen one
    reasons: Mapping[str, str] = field(default_factory=dict)  # key -> why it was not chosen
    faster_than_original: bool | None = None  # None: not timed here
    notes: tuple[str, ...] = ()


def _order(entry: Entry, backends: Sequence[str]) -> tuple[int, int]:
    backend_rank = backends.index(entry.backend) if entry.backend in backends else len(backends)
    return precisions.rank(entry.precision), backend_rank


def choose(entries: Sequence[Entry], original: Timing | None, backends: Sequence[str], *,
           auto: bool = True) -> Verdict:
    """The verdict for ``entries``; ``original`` is the input model timed with them (None: not timed)."""
    eligible = [e for e in entries if e.status is Status.OK]
    if not eligible:
        return Verdict(None, "no candidate passed verification and the accuracy budget")
    timed = [e for e in eligible if e.timing is not None]
    if not timed:
        best = min(eligible, key=lambda e: (precisions.UNTIMED_PREFERENCE.index(e.precision)
                                            if e.precision in precisions.UNTIMED_PREFERENCE else 99,
                                            _order(e, backends)[1]))
        return Verdict(best.key, "chosen by precision preference: latency cannot be measured on this machine",
                       reasons={e.key: f"not preferred over {best.key} (not timed here)"
                                for e in eligible if e is not best})
    notes = []
    noisy = [e.key for e in timed if e.timing.cv > NOISY_CV]
    if noisy:
        notes.append(f"the machine was noisy while timing ({', '.join(noisy)} varied more than "
                     f"{NOISY_CV:.0%} between rounds): close results are reported as ties")
    fastest = min(timed, key=lambda e: e.timing.p50_ms)
    tied = [e for e in timed if not significantly_faster(fastest.timing, e.timing, MIN_GAIN)]
    best = min(tied, key=lambda e: _order(e, backends))
    reasons = {}
    for e in timed:
        if e is best:
            continue
        if e in tied:
            reasons[e.key] = f"tie with {best.key} (within {MIN_GAIN:.0%} or the noise); the simpler precision ships"
        else:
            reasons[e.key] = (f"slower than {fastest.key} ({e.timing.p50_ms:.3f} ms vs "
                              f"{fastest.timing.p50_ms:.3f} ms)")
    ties = tuple(e.key for e in tied if e is not best)
    why = f"fastest within the budget ({best.timing.p50_ms:.3f} ms)" if not ties else \
        f"tied with {', '.join(ties)} on speed; the simpler precision ships"
    if original is None:
        return Verdict(best.key, why, ties, reasons, None, tuple(notes))
    if significantly_faster(best.timing, original, MIN_GAIN):
        return Verdict(best.key, why, ties, reasons, True, tuple(notes))
    if significantly_faster(original, best.timing, ORIGINAL_MARGIN):
        # every candidate is slower than what the user already has: give them that back
        reasons = {**reasons, best.key: (f"slower than the original ({best.timing.p50_ms:.3f} ms vs "
                                         f"{original.p50_ms:.3f} ms)")}
        return Verdict(ORIGINAL, "every optimised candidate was slower than the original: the original model "
                                 "ships unchanged", (), reasons, False, tuple(notes))
    fp32 = [e for e in timed if e.precision == "fp32" and not significantly_faster(original, e.timing, ORIGINAL_MARGIN)]
    if not auto or best.precision == "fp32" or not fp32:
        return Verdict(best.key, why + "; not significantly faster than the original", ties, reasons, False,
                       tuple(notes))
    fallback = min(fp32, key=lambda e: _order(e, backends))
    reasons = {**reasons, best.key: (f"not significantly faster than the original ({best.timing.p50_ms:.3f} ms "
                                     f"vs {original.p50_ms:.3f} ms): not worth its lower precision")}
    reasons.pop(fallback.key, None)
    return Verdict(fallback.key, "nothing was significantly faster than the original: the optimised fp32 ships",
                   (), reasons, False, tuple(notes))
