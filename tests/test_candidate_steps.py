"""A candidate is built in four steps, each a function of frozen values (dlopt.flow.candidates):
compile -> run -> compare -> judge.  Compare and judge are policy: tested here on values, no compile."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from dlopt.core.config import CompileConfig
from dlopt.core.precisions import Status
from dlopt.core.profiles import resolve_target
from dlopt.flow import candidates
from dlopt.flow.candidates import Compiled, Ran, compare_candidate, judge_candidate
from dlopt.flow.evaluation import EvalData, Evaluation
from dlopt.measure.budget import Scorer
from dlopt.report.data import Candidate
from dlopt.targets.base import Artifact

LOGITS = np.array([[4.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [2.0, 0.5, 0.0]], np.float32)
LABELS = np.array([0, 1, 2, 0])


@pytest.fixture
def ev():
    reference = ([LOGITS],)
    return Evaluation(config=CompileConfig.build("m.onnx", max_accuracy_drop=10.0), profile=resolve_target("cpu"),
                      data=EvalData(({"x": np.zeros((4, 3), np.float32)},), (LABELS,), "test"), reference=reference,
                      scorer=Scorer(list(reference), [LABELS]), shapes={"x": (4, 3)}, timing_feed={}, original_ms=1.0)


@pytest.fixture
def compiled(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0" * 1234)
    artifact = Artifact("ort", "int8", tmp_path, ["model.onnx"], "model.onnx")
    return Compiled(Candidate("ort", "int8", Status.OK), None, artifact, None)


def opener():
    return None


def test_a_faithful_candidate_is_compared_scored_and_judged_ok_and_timed(ev, compiled):
    ran = Ran(compiled, [[LOGITS * 1.001]], "int8", factory=opener)
    cand = compare_candidate(ev, ran, None)
    assert cand.fidelity.max_rel_error == pytest.approx(0.001, rel=1e-3)
    assert (cand.measurement.size_bytes, cand.measurement.accuracy, cand.ran_as) == (1234, 1.0, "int8")
    assert cand.score.drop_pp == 0.0 and cand.status is Status.OK
    built = judge_candidate(ev, ran, cand, None)
    assert (built.candidate.status, built.candidate.reason, built.runner) == (Status.OK, "", opener)


def test_a_lower_precision_over_the_budget_is_rejected_and_still_timed(ev, compiled):
    wrong = LOGITS[:, ::-1].copy()  # every argmax moves: 75 points of top-1 lost
    ran = Ran(compiled, [[wrong]], factory=opener)
    built = judge_candidate(ev, ran, compare_candidate(ev, ran, None), None)
    assert built.candidate.status is Status.REJECTED
    assert built.candidate.reason == "accuracy budget: top-1 accuracy drops 75.00 points, over the budget of 10.0"
    assert built.runner is opener  # timed beside the finalists: what the budget cost


def test_too_slow_and_quick_trials_are_never_scored(ev, compiled):
    slow = Ran(compiled, [[LOGITS]], slow_ms=30.0, factory=opener)
    cand = compare_candidate(ev, slow, None)
    assert cand.score is None and cand.fidelity.max_rel_error == 0.0
    built = judge_candidate(ev, slow, cand, None)
    assert built.candidate.status is Status.REJECTED and built.runner is None
    assert built.candidate.reason.startswith("too slow to compete: 30.0 ms a run, 30x the original's 1.00 ms")
    trial = Ran(compiled, [[LOGITS]], factory=opener)
    built = judge_candidate(ev, trial, compare_candidate(ev, trial, 1), 1)
    assert (built.candidate.status, built.candidate.score, built.runner) == (Status.OK, None, None)


def test_each_step_is_small():
    steps = (candidates.build, candidates.compile_candidate, candidates.run_candidate, candidates.compare_candidate,
             candidates.judge_candidate)
    lines = {f.__name__: len(inspect.getsource(f).splitlines()) for f in steps}
    assert max(lines.values()) <= 45, lines
