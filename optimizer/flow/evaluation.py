"""What every candidate is measured with (:class:`Evaluation`, fixed before the first is built), and
the quick look that spares a hopeless candidate a full evaluation and its timing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlopt.core.config import CompileConfig
from dlopt.core.layout import samples_in
from dlopt.core.profiles import TargetProfile
from dlopt.core.progress import raise_if_interrupted
from dlopt.measure.budget import Scorer, is_classifier_output
from dlopt.measure.evaluate import top1_accuracy
from dlopt.measure.timing import run_ms

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class EvalData:
    """The evaluation feeds every model sees, their labels when known, and where they came from."""

    feeds: tuple[Feed, ...]
    labels: tuple[np.ndarray, ...]
    source: str
    axes: dict | None = None  # each input's batch axis (dlopt.core.layout); None: the first

    @property
    def samples(self) -> int:
        return sum(samples_in(f, self.axes) if f else 0 for f in self.feeds)


@dataclass(frozen=True)
class Evaluation:
    """What every candidate is measured with; built once, before the first candidate."""

    config: CompileConfig
    profile: TargetProfile
    data: EvalData
    reference: tuple[list[np.ndarray], ...]  # the original's outputs, feed by feed
    scorer: Scorer
    shapes: dict[str, tuple[int, ...]]  # the declared timing shape of each input
    timing_feed: Feed
    original_ms: float | None  # a quick estimate of the original's latency, to spot hopeless candidates
    ranges: Path | None = None  # calibration table for int8
    cache: object | None = None  # dlopt.flow.cache.ArtifactCache, or None to always build
    calibration: dict | None = None  # what calibration did (dlopt.flow.ranges.RangeStats + source)
    recipe: object | None = None  # dlopt.flow.recipe.Recipe: how INT8 is made for this graph
    # calibration batches when a quantiser reads them again (NNCF, SmoothQuant): a re-readable dataset
    # (streamed again) or a tuple of feeds
    calib_feeds: object = ()
    smoothed: object | None = None  # dlopt.core.pipeline.PipelineResult of SmoothQuant: what dlopt's static INT8 starts from

    def progress(self, stage: str, done: int, total: int) -> None:
        raise_if_interrupted()  # after every feed: an interrupt a build swallowed ends the compile here
        if self.config.progress is not None:
            self.config.progress(stage, done, total)

    def outputs(self, runner, label: str, limit: int | None = None) -> list:
        feeds = self.data.feeds[:limit] if limit else self.data.feeds
        outputs = []
        for i, feed in enumerate(feeds):
            outputs.append(owned(runner.run(feed)))
            self.progress(f"{label}: outputs", i + 1, len(feeds))
        return outputs

    def accuracy(self, outputs: list) -> float | None:
        if not self.data.labels or len(outputs) != len(self.data.labels):
            return None

        if not outputs or not is_classifier_output(outputs[0][0]):  # labels for a user metric, not classes
            return None
        return top1_accuracy((o[0] for o in outputs), self.data.labels)


def owned(outputs) -> list[np.ndarray]:
    """Copies of a run's outputs that own their memory.  ONNX Runtime's numpy outputs can live in the
    session's arena and keep all of it alive (a 640x640 detector at batch 16: about 1 GB per kept ORT
    candidate, 5.1 GB by the end of a compile); kept outputs must not hold sessions' memory."""
    return [np.array(o, copy=True) for o in outputs]


# A candidate slower than the original never ships (dlopt.flow.select, rule 3), so one whose warm runs
# take SLOW_FACTOR times the original's latency cannot win: it is checked on a few feeds, rejected as
# too slow and never timed.  Untuned TVM on x86 ran a 416x416 YOLOX at 3 s a run and still passed
# the earlier 20x line: built and evaluated on all 60 samples (282 s), then timed, cutting every
# candidate's runs to 20.
SLOW_FACTOR = 3.0
# Below this a full evaluation and timing cost too little to skip, and a first run's noise weighs most.
SLOW_FLOOR_MS = 20.0
# Timed runs after a first one over the line: the fastest decides, so one hiccup never rejects.
SLOW_TRIES = 2
SLOW_CHECK_FEEDS = 4
# ...and no feed after this many seconds of checking (a feed may be a batch of 32 samples).
SLOW_CHECK_SECONDS = 10.0


def too_slow(ev: Evaluation, runner) -> float | None:
    """The fastest of a few runs at the timing shape when it is over the line, else None (one run)."""
    base = ev.original_ms
    if not base:
        return None
    line = max(SLOW_FACTOR * base, SLOW_FLOOR_MS)
    best = run_ms(runner, ev.timing_feed)  # the first run: an upper bound, first-run costs included
    for _ in range(SLOW_TRIES):
        if best <= line:
            return None
        best = min(best, run_ms(runner, ev.timing_feed))
    return best if best > line else None


def spot_check(ev: Evaluation, runner, label: str, limit: int | None) -> list:
    """Outputs on the first few feeds only: a too-slow candidate's correctness, within seconds."""
    feeds = ev.data.feeds[: min(limit or SLOW_CHECK_FEEDS, SLOW_CHECK_FEEDS)]
    outputs, start = [], time.perf_counter()
    for i, feed in enumerate(feeds):
        if outputs and time.perf_counter() - start > SLOW_CHECK_SECONDS:
            break
        outputs.append(owned(runner.run(feed)))
        ev.progress(f"{label}: outputs", i + 1, len(feeds))
    return outputs
