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
   says so; when even that is slower, the original model ships unchanged — unless
   the user asked for a changed model (``--prune``): then the original is not a
   candidate, and the artefact ships with a note that it is slower.
4. Not timed here (a device target): the precision usually fastest on devices.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from dlopt.core import precisions
from dlopt.core.errors import CompileError, ModelError
from dlopt.core.precisions import Status
from dlopt.measure.budget import Score
from dlopt.measure.timing import MIN_RUNS, NOISY_CV, RESOLUTION_MS, Timing, significantly_faster

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
    loss: float | None = None  # the accuracy it gives up (any unit, smaller is better): breaks a tie of the same
    #                            precision and backend (None: after every known loss)


@dataclass(frozen=True)
class Verdict:
    chosen: str | None
    why: str
    ties: tuple[str, ...] = ()  # candidates the rule cannot tell apart from the chosen one
    reasons: Mapping[str, str] = field(default_factory=dict)  # key -> why it was not chosen
    faster_than_original: bool | None = None  # None: not timed here
    notes: tuple[str, ...] = ()
    speed: str = ""  # the chosen one against the original, in words that agree with the interval


def _held_together(fast: Timing, slow: Timing) -> str:
    """Why ``fast`` does not beat ``slow`` under the rule, in words that agree with the numbers."""
    ratio = fast.p50_ms / slow.p50_ms if slow.p50_ms > 0 else 1.0
    if min(fast.runs, slow.runs) < MIN_RUNS:
        return f"{ratio:.2f}x, not told apart: {min(fast.runs, slow.runs)} runs, under the {MIN_RUNS} the rule needs"
    if not fast.ci_high_ms < slow.ci_low_ms:
        return f"{ratio:.2f}x, not told apart: their 95% intervals overlap"
    if fast.p50_ms > slow.p50_ms * (1 - MIN_GAIN):
        return f"{ratio:.2f}x, a tie: under the {MIN_GAIN:.0%} gain that counts"
    return f"{ratio:.2f}x, a tie: {(slow.p50_ms - fast.p50_ms) * 1e3:.1f} us apart, under the " \
           f"{RESOLUTION_MS * 1e3:.0f} us timing resolution"


def speed_words(timing: Timing, original: Timing) -> str:
    """The candidate against the original, in words that agree with the 95% interval and name the rule."""
    if significantly_faster(timing, original, MIN_GAIN):
        return "significantly faster than the original"
    if min(timing.runs, original.runs) >= MIN_RUNS and timing.ci_high_ms < original.ci_low_ms:
        gain = 1 - timing.p50_ms / original.p50_ms
        if gain < MIN_GAIN:
            return f"faster than the original, but by {gain:.1%}, under the {MIN_GAIN:.0%} that counts"
        return (f"faster than the original, but by {(original.p50_ms - timing.p50_ms) * 1e3:.1f} us, under the "
                f"{RESOLUTION_MS * 1e3:.0f} us timing resolution")
    if min(timing.runs, original.runs) < MIN_RUNS:
        return (f"not shown faster than the original: {min(timing.runs, original.runs)} runs, under the "
                f"{MIN_RUNS} the rule needs")
    if timing.p50_ms >= original.p50_ms:
        return "not faster than the original"
    return "not significantly faster than the original (their 95% intervals overlap)"


def _order(entry: Entry, backends: Sequence[str]) -> tuple[int, int, float]:
    backend_rank = backends.index(entry.backend) if entry.backend in backends else len(backends)
    return precisions.rank(entry.precision), backend_rank, math.inf if entry.loss is None else entry.loss


def choose(entries: Sequence[Entry], original: Timing | None, backends: Sequence[str], *,
           auto: bool = True, lossy: str | None = None) -> Verdict:
    """The verdict for ``entries``; ``original`` is the input model timed with them (None: not timed).

    ``lossy`` names an explicit request for a changed model (``--prune 0.5``): the original is then
    not a candidate, and a chosen artefact slower than it ships with a note saying so."""
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
                     f"{NOISY_CV:.0%} between rounds): close results are not told apart")
    fastest = min(timed, key=lambda e: e.timing.p50_ms)
    tied = [e for e in timed if not significantly_faster(fastest.timing, e.timing, MIN_GAIN)]
    best = min(tied, key=lambda e: _order(e, backends))
    reasons = {}
    for e in timed:
        if e is best:
            continue
        if e in tied:
            fast, slow = (e, best) if e.timing.p50_ms < best.timing.p50_ms else (best, e)
            words = _held_together(fast.timing, slow.timing)
            kind = "tie with" if ", a tie:" in words else "not told apart from"
            ships = "the smaller accuracy loss ships" if _order(e, backends)[:2] == _order(best, backends)[:2] \
                else "the simpler precision ships"
            reasons[e.key] = (f"{kind} {best.key} ({e.key} at {e.timing.p50_ms / best.timing.p50_ms:.2f}x its "
                              f"latency; {words.split(', ', 1)[1]}); {ships}")
        else:
            reasons[e.key] = (f"slower than {fastest.key} ({e.timing.p50_ms:.3f} ms vs "
                              f"{fastest.timing.p50_ms:.3f} ms)")
    ties = tuple(e.key for e in tied if e is not best)
    all_ties = all(reasons[k].startswith("tie with") for k in ties)
    same = all(_order(next(e for e in tied if e.key == k), backends)[:2] == _order(best, backends)[:2] for k in ties)
    why = f"fastest within the budget ({best.timing.p50_ms:.3f} ms)" if not ties else \
        (f"{'tied with' if all_ties else 'not told apart on speed from'} {', '.join(ties)}; "
         f"{'the smaller accuracy loss' if same else 'the simpler precision'} ships")
    if original is None:
        return Verdict(best.key, why, ties, reasons, None, tuple(notes))
    speed = speed_words(best.timing, original)
    if significantly_faster(best.timing, original, MIN_GAIN):
        return Verdict(best.key, why, ties, reasons, True, tuple(notes), speed)
    if lossy and significantly_faster(original, best.timing, ORIGINAL_MARGIN):
        notes.append(f"{best.key} is slower than the original ({best.timing.p50_ms:.3f} ms vs {original.p50_ms:.3f} "
                     f"ms) but ships: {lossy} asked for a changed model, so the original is not a candidate")
        return Verdict(best.key, f"{why}; {speed}; shipped because {lossy} was asked for", ties, reasons, False,
                       tuple(notes), speed)
    if significantly_faster(original, best.timing, ORIGINAL_MARGIN):
        # every candidate is slower than what the user already has: give them that back
        reasons = {**reasons, best.key: (f"slower than the original ({best.timing.p50_ms:.3f} ms vs "
                                         f"{original.p50_ms:.3f} ms)")}
        return Verdict(ORIGINAL, "every optimised candidate was slower than the original: the original model "
                                 "ships unchanged", (), reasons, False, tuple(notes))
    fp32 = [e for e in timed if e.precision == "fp32" and not significantly_faster(original, e.timing, ORIGINAL_MARGIN)]
    if not auto or best.precision == "fp32" or not fp32:
        return Verdict(best.key, f"{why}; {speed}", ties, reasons, False, tuple(notes), speed)
    fallback = min(fp32, key=lambda e: _order(e, backends))
    reasons = {**reasons, best.key: (f"{speed} ({best.timing.p50_ms:.3f} ms vs {original.p50_ms:.3f} ms): not worth "
                                     f"its lower precision")}
    reasons.pop(fallback.key, None)
    return Verdict(fallback.key, "nothing was significantly faster than the original: the optimised fp32 ships",
                   (), reasons, False, tuple(notes), speed_words(fallback.timing, original))


# -- when nothing met the budget: the original's floor, else the closest, written and failed loudly --

def original_floor(verdict: Verdict, can_ship: bool) -> tuple[Verdict, list[str]]:
    """Nothing optimised met the budget and its checks: the original meets any budget by definition, so
    it ships where it ``can_ship`` (the driver's ``_original_can_ship``); else the verdict stands."""
    if verdict.chosen is not None or not can_ship:
        return verdict, []
    return (replace(verdict, chosen=ORIGINAL, why="no optimised candidate met the accuracy budget and its checks: "
                                                  "the original model ships unchanged"),
            ["no optimised candidate met the accuracy budget and its checks; ort/original (the input model, "
             "unchanged) ships instead"])


@dataclass(frozen=True)
class OverBudget:
    """The verdict after :func:`closest_over_budget`; ``closest`` is None when a candidate met the budget."""

    verdict: Verdict
    closest: object | None = None  # the candidate written anyway, the compile then failing
    scored: tuple = ()  # every candidate that was built, ran and was scored: the error's line names the nearest
    notes: tuple[str, ...] = ()


def closest_over_budget(verdict: Verdict, candidates: Sequence, built: frozenset[str] | set[str],
                        target: str) -> OverBudget:
    """Nothing was chosen: keep the scored candidate closest to the budget (of those ``built``, by key) so
    the work is not lost; with none scored, ModelError when no backend supports the model, else CompileError."""
    if verdict.chosen is not None:
        return OverBudget(verdict)
    scored = tuple(c for c in candidates if c.score is not None and c.key in built)
    if not scored:
        reasons = "; ".join(f"{c.key}: {c.reason}" for c in candidates)
        if candidates and all(c.status is Status.UNSUPPORTED for c in candidates):
            raise ModelError(f"no backend of target {target} supports this model ({reasons})")
        raise CompileError(f"no backend of target {target} produced a usable artefact ({reasons})")
    closest = min(scored, key=_drop)
    return OverBudget(replace(verdict, chosen=closest.key, why="closest to the budget; no candidate met it"),
                      closest, scored,
                      (f"no candidate met the accuracy budget; {closest.key} (closest) was written anyway",))


# -- what the budget refused, and how to let the task decide ---------------------------------------

TASK_METRIC = "--metric module:function"
BUDGET_RULE = "accuracy budget:"  # how candidates.judge starts a refusal by the budget


def _drop(candidate) -> float:
    return float(Score.from_dict(candidate.score).drop_pp) if candidate.score else float("inf")  # a dict read too


def over_budget_message(metric: str, max_drop: float, scored: Sequence, out) -> str:
    """The one line when nothing shipped: the closest candidates and the rule that refused each.

    ``scored``: candidates (``key``, ``score``, ``reason``) that ran and were scored.  A
    candidate closest on the metric may have been refused by another rule (the fp32 check):
    the line says which, instead of calling a 0.01-point drop over a 1-point budget.
    """
    near = sorted(scored, key=_drop)[:3]
    closest = near[0]
    refusals = "; ".join(f"{c.key}: {c.reason}" for c in near if c.reason)
    line = (f"no candidate kept {metric} within {max_drop} points and passed its checks (closest: {closest.key}, "
            f"{_drop(closest):.2f} points){'; ' + refusals if refusals else ''}; {closest.key} was written to {out} "
            f"with its report")
    if any((c.reason or "").startswith(BUDGET_RULE) for c in near):
        line += f"; if {metric} is not what your task measures, let a task metric decide: {TASK_METRIC}"
    return line


def missed_budget_notes(candidates: Sequence, chosen: str | None, timings: Mapping[str, Timing], metric: str,
                        max_drop: float) -> list[str]:
    """A note when a lower precision than the one that ships (int8, fp16, ...) missed the budget.

    It says by how much each missed and, when it was timed in the same interleaved run, how
    fast it was against what shipped; candidates outside the budget are normally not timed
    (the measure stage times only what could ship), and the note says so rather than guess
    from a first run.  It names the flag that lets the task's own metric decide.
    """
    shipped = next((c for c in candidates if c.key == chosen), None)
    if shipped is None:
        return []
    missed = [c for c in candidates if c.status is Status.REJECTED and (c.reason or "").startswith(BUDGET_RULE)
              and precisions.rank(c.precision) > precisions.rank(shipped.precision)]
    if not missed:
        return []
    base = timings.get(chosen)
    parts, untimed = [], []
    for c in sorted(missed, key=_drop):
        text = f"{c.key} by {_drop(c) - max_drop:.2f} points ({metric} -{_drop(c):.2f})"
        timing = timings.get(c.key)
        if timing is not None and base is not None and timing.p50_ms > 0:
            text += f", {base.p50_ms / timing.p50_ms:.2f}x the speed of {chosen} in the same interleaved run"
        else:
            untimed.append(c.key)
        parts.append(text)
    note = f"missed the accuracy budget of {max_drop} points: {'; '.join(parts)}"
    if untimed:
        note += (f"; {', '.join(untimed)} {'was' if len(untimed) == 1 else 'were'} not timed (only candidates "
                 f"within the budget are), so how much faster {'it' if len(untimed) == 1 else 'they'} would run "
                 f"than {chosen} is not known")
    return [f"{note}; if {metric} is a proxy your task does not feel, let a task metric decide: {TASK_METRIC}"]
