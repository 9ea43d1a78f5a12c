"""What ``dlopt gate`` reads beside the reports: latency compared with intervals, re-timed where it can be.

Two p50s from separate runs on a shared machine differ by more than a 10% limit with
nothing changed (+16%, -4%, +16% on three gates of one model).  So a latency regression
counts only when the 95% intervals of the two medians separate *and* the limit is
crossed.  When both output folders are at hand, baseline and candidate are loaded
(``dlopt.load``) and re-timed interleaved in this process (``dlopt.measure.timing``); from
reports alone their own intervals are compared, and the result says the comparison
crosses runs.  The evaluation data of two reports is also compared by content here,
so the same data at another path is the same data.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dlopt.core.errors import ConfigError, DloptError, first_line

RETIMED = "re-timed interleaved"  # both artefacts timed in rotating blocks in this process, now
CROSS_RUN = "cross-run"  # each side's figures come from its own compile (another run, maybe another machine)
SAME_RUN = "same run"  # the candidate and the report's original, timed interleaved by the compile
DEFAULT_RUNS = 50
WARMUP = 5


@dataclass(frozen=True)
class Side:
    """One side's median and the 95% interval of it (None when the report has none)."""

    key: str
    p50_ms: float
    ci_low_ms: float | None
    ci_high_ms: float | None
    runs: int | None

    @classmethod
    def of(cls, key: str, latency: Any) -> "Side | None":
        """From a report's latency object; None when it has no usable p50."""
        p50 = _number(latency, "p50_ms")
        if p50 is None or p50 <= 0:
            return None
        low, high, runs = _number(latency, "ci_low_ms"), _number(latency, "ci_high_ms"), _number(latency, "runs")
        if low is None or high is None or not low <= p50 <= high:  # a hand-edited or pre-1.1 report
            low = high = None
        return cls(key, p50, low, high, int(runs) if runs is not None and runs >= 0 else None)

    @property
    def has_interval(self) -> bool:
        return self.ci_low_ms is not None

    def to_dict(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v, 6)

        return {"key": self.key, "p50_ms": ms(self.p50_ms), "ci_low_ms": ms(self.ci_low_ms),
                "ci_high_ms": ms(self.ci_high_ms), "runs": self.runs}

    def describe(self) -> str:
        interval = f" (95% CI {self.ci_low_ms:.5g}-{self.ci_high_ms:.5g})" if self.has_interval else ""
        return f"{self.p50_ms:.5g} ms{interval}"


def _number(obj: Any, key: str) -> float | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class LatencyComparison:
    """The candidate's median against the reference's, and how they were obtained (``mode``)."""

    mode: str  # RETIMED | CROSS_RUN | SAME_RUN
    candidate: Side
    reference: Side
    note: str = ""  # why a re-timing was not possible, when it was wanted

    @property
    def ratio(self) -> float:
        return self.candidate.p50_ms / self.reference.p50_ms

    @property
    def percent(self) -> float:
        return round((self.ratio - 1.0) * 100.0, 2)

    @property
    def intervals(self) -> bool:
        return self.candidate.has_interval and self.reference.has_interval

    def separated(self) -> str | None:
        """"slower" or "faster" when the intervals separate on enough runs and by more than timing
        resolves; None when they overlap (or there are no intervals or too few runs)."""
        from dlopt.measure.timing import MIN_RUNS, RESOLUTION_MS

        c, r = self.candidate, self.reference
        if not self.intervals or min(c.runs or 0, r.runs or 0) < MIN_RUNS:
            return None
        if abs(c.p50_ms - r.p50_ms) < RESOLUTION_MS:
            return None
        if c.ci_low_ms > r.ci_high_ms:
            return "slower"
        return "faster" if c.ci_high_ms < r.ci_low_ms else None

    def judge(self, allowed: float) -> tuple[str, str]:
        """(status, why).  A limit >= 0 fails only when crossed with separated intervals; a negative limit
        (a speed-up is demanded) passes only when met with separated intervals.  Without intervals (reports
        older than schema 1.1) the p50s alone decide, as they did."""
        crossed = self.percent > allowed
        if not self.intervals:
            return ("failed" if crossed else "passed"), "no intervals in the report(s): p50s alone decide"
        side = self.separated()
        if allowed >= 0:
            if crossed and side == "slower":
                return "failed", "intervals separate: the slow-down is significant"
            if crossed:
                return "passed", "over the limit, but the intervals overlap: not a significant slow-down"
            return "passed", "within the limit"
        if not crossed and side == "faster":
            return "passed", "intervals separate: the speed-up is significant"
        return "failed", ("the demanded speed-up was not met" if crossed
                          else "the speed-up is within the noise: intervals overlap")

    def describe(self) -> str:
        how = {RETIMED: f"{RETIMED} on this machine ({self.candidate.runs} runs each)",
               CROSS_RUN: f"{CROSS_RUN}: each figure from its own compile, intervals as reported",
               SAME_RUN: "timed interleaved with the original in the compile"}[self.mode]
        note = f" ({self.note})" if self.note else ""
        return (f"{how}{note}: p50 {self.candidate.describe()} for {self.candidate.key} vs "
                f"{self.reference.describe()} for {self.reference.key}, ratio {self.ratio:.3f}")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "candidate": self.candidate.to_dict(), "reference": self.reference.to_dict(),
                "ratio": round(self.ratio, 4), "percent": self.percent, "separated": self.separated(),
                "note": self.note}


# -- the output folders -----------------------------------------------------------------------------
def output_folder(path: Path) -> Path | None:
    """The dlopt output folder ``path`` (a folder, or a report.json in one) stands for, if it holds a manifest."""
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "manifest.json").is_file() else None


def retime(candidate: Path, reference: Path, *, runs: int = DEFAULT_RUNS, warmup: int = WARMUP,
           reference_name: str = "the baseline") -> LatencyComparison:
    """Load both folders' shipped artefacts and time them interleaved on one feed at the candidate's
    timing shape.  Raises DloptError when either cannot be loaded or run here (the caller falls back).

    A slow-down must reproduce: when the first pass shows one, both artefacts are loaded again, in the
    other order, and timed in a second pass; the gentler pass is judged.  Two identical 0.02 ms ORT
    artefacts once timed 2.1x apart with separated intervals in one process (buffer placement, load
    order or another process's burst), which a fresh second pass does not repeat; a real regression does.
    """
    first = _interleaved(candidate, reference, runs=runs, warmup=warmup, reference_name=reference_name,
                         reference_first=False)
    if first.separated() != "slower":
        return first
    second = _interleaved(candidate, reference, runs=runs, warmup=warmup, reference_name=reference_name,
                          reference_first=True)
    kept = min((first, second), key=lambda c: c.ratio)
    return replace(kept, note=f"slower in a first pass (ratio {first.ratio:.3f}); a second pass, both loaded "
                              f"again in the other order: ratio {second.ratio:.3f}; the gentler pass is judged")


def _interleaved(candidate: Path, reference: Path, *, runs: int, warmup: int, reference_name: str,
                 reference_first: bool) -> LatencyComparison:
    import contextlib

    import dlopt
    from dlopt.measure.timing import time_interleaved

    with contextlib.ExitStack() as stack:
        order = (reference, candidate) if reference_first else (candidate, reference)
        loaded = {path: stack.enter_context(dlopt.load(path)) for path in order}
        cand, ref = loaded[candidate], loaded[reference]
        feed = _feed(cand, candidate)
        theirs = [(s.name, s.dtype) for s in ref.inputs]
        if theirs != [(s.name, s.dtype) for s in cand.inputs]:
            raise ConfigError(f"{reference_name} takes other inputs ({', '.join(s.describe() for s in ref.inputs)})")
        ref.run(feed)  # a shape it cannot take fails here, in one line
        # the artefacts as loaded above first, then loaded afresh by their runners: one session is not another
        threads = int((cand.manifest.get("options") or {}).get("threads") or 1)
        timings = time_interleaved({"candidate": cand, "reference": ref}, feed, runs=runs, warmup=warmup,
                                   threads=threads)
        return LatencyComparison(RETIMED, _side(cand.key, timings["candidate"]),
                                 _side(f"{reference_name}'s {ref.key}", timings["reference"]))


def _side(key: str, timing) -> Side:
    return Side(key, timing.p50_ms, timing.ci_low_ms, timing.ci_high_ms, timing.runs)


def _feed(runner, folder: Path) -> dict:
    """The first verify.npz feed when it has the timing shape, else a seeded random one of that shape."""
    import numpy as np

    shapes = runner.manifest.get("timing_shapes") or {}
    try:
        from dlopt.device.device_check import VerifyData

        first = VerifyData(folder / "verify.npz").feeds[0]
        if all(list(first[s.name].shape) == list(shapes.get(s.name, first[s.name].shape)) for s in runner.inputs):
            return {s.name: first[s.name] for s in runner.inputs}
    except (ValueError, KeyError, IndexError, OSError):  # VerifyFileError is a ValueError
        pass
    rng = np.random.default_rng(0)
    feed = {}
    for spec in runner.inputs:
        dims = shapes.get(spec.name) or [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        dtype = spec.dtype or np.dtype(np.float32)
        feed[spec.name] = (rng.standard_normal(dims).astype(dtype) if dtype.kind == "f"
                           else np.zeros(dims, dtype=dtype))
    return feed


def compare_latency(report: dict, cand: dict, baseline: dict | None, ref: dict | None, *,
                    folders: tuple[Path | None, Path | None] = (None, None), runs: int = DEFAULT_RUNS,
                    retime_here: bool = True) -> LatencyComparison | None:
    """The comparison the latency gate judges, or None when a side has no p50 (the gate is skipped).

    With a baseline and both folders at hand the artefacts are re-timed here; otherwise (or when that
    fails: an artefact for another device, other inputs) the reports' own figures, labelled cross-run."""
    mine = Side.of(report["chosen"], (cand.get("measurement") or {}).get("latency"))
    if baseline is None:
        theirs = Side.of("the original model", report["baseline"].get("latency"))
        return LatencyComparison(SAME_RUN, mine, theirs) if mine and theirs else None
    ref_name = f"the baseline report's {baseline['chosen']}"
    theirs = Side.of(ref_name, ((ref or {}).get("measurement") or {}).get("latency"))
    if mine is None or theirs is None:
        return None
    note = ""
    if retime_here and all(folders):
        try:
            return retime(folders[0], folders[1], runs=runs)
        except DloptError as exc:
            note = f"not re-timed: {first_line(exc)}"
        except Exception as exc:  # a runtime refusing an artefact (dlopt.load lets ORT's load errors through)
            note = f"not re-timed: {type(exc).__name__}: {first_line(exc)}"
    elif retime_here and any(folders):  # the Python API without folders wants no note
        missing = "the baseline" if folders[0] else "this report"
        note = f"not re-timed: {missing} is a report without its output folder"
    return LatencyComparison(CROSS_RUN, mine, theirs, note)


# -- the evaluation data, by content ---------------------------------------------------------------
def same_evaluation(report: dict, baseline: dict, folders: tuple[Path | None, Path | None]) -> str | None:
    """How we know two reports were evaluated on the same bytes although their sources' paths differ
    (a sentence), or None when nothing says so.  Tried in order: a ``sha256`` in both reports'
    ``evaluation``; the files at both sources' paths; the inputs kept in both folders' verify.npz."""
    ev, ref_ev = report.get("evaluation") or {}, baseline.get("evaluation") or {}
    if any(ev.get(k) != ref_ev.get(k) for k in ("feeds", "samples", "labelled")):
        return None
    sha, ref_sha = ev.get("sha256"), ref_ev.get("sha256")
    if isinstance(sha, str) and isinstance(ref_sha, str):
        return f"same evaluation data (sha256 {sha[:12]} in both reports)" if sha == ref_sha else None
    files = [_source_file(e.get("source"), f) for e, f in ((ev, folders[0]), (ref_ev, folders[1]))]
    if all(files):
        try:
            if files[0].stat().st_size != files[1].stat().st_size:
                return None  # other sizes, other bytes: no need to read them
        except OSError:
            return None
        digests = [_file_sha256(f) for f in files]
        if None not in digests:
            if digests[0] != digests[1]:
                return None
            return f"same evaluation data at another path (sha256 {digests[0][:12]} of both files)"
    digests = [_verify_sha256(f) if f else None for f in folders]
    if digests[0] is not None and digests[0] == digests[1]:
        return "same evaluation data at another path (the feeds kept in both verify.npz are identical)"
    return None


def _source_file(source: Any, folder: Path | None) -> Path | None:
    """The file a relative source names: from here, or from the output folder's parent (where the
    compile most likely ran)."""
    if not isinstance(source, str) or not source or "\x00" in source:
        return None
    path = Path(source)
    for candidate in ([path] if path.is_absolute() else [path, *([folder.parent / path] if folder else [])]):
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            pass
    return None


def _file_sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _verify_sha256(folder: Path) -> str | None:
    """sha256 over the evaluation inputs (and labels) verify.npz keeps: names, dtypes, shapes, bytes."""
    import numpy as np

    try:
        with np.load(folder / "verify.npz", allow_pickle=False) as archive:
            names = sorted(k for k in archive.files if k.startswith(("in_", "labels_")))
            digest = hashlib.sha256()
            for name in names:
                array = np.ascontiguousarray(archive[name])
                digest.update(f"{name}:{array.dtype.str}:{array.shape}\n".encode())
                digest.update(array.tobytes())
    except (OSError, ValueError, KeyError):
        return None
    return digest.hexdigest() if names else None
