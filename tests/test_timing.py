"""Interleaved timing and the interval of the median (dlopt.measure.timing)."""

import time

import numpy as np
import pytest

from dlopt.measure.timing import BaseRunner, LocalRunner, median_interval, significantly_faster, time_interleaved


def test_median_interval_brackets_the_median_and_narrows_with_more_runs():
    rng = np.random.default_rng(0)
    small, large = rng.normal(10, 1, 30), rng.normal(10, 1, 3000)
    lo_s, hi_s = median_interval(small)
    lo_l, hi_l = median_interval(large)
    assert lo_s <= np.median(small) <= hi_s and lo_l <= np.median(large) <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5
    # for n=100 the 95% interval runs from about the 40th to the 60th order statistic
    ordered = np.sort(large[:100])
    assert median_interval(large[:100]) == (ordered[40], ordered[60])


def test_interleaved_timing_separates_a_real_difference():
    def fast(_):
        time.sleep(0.001)

    def slow(_):
        time.sleep(0.003)

    timings = time_interleaved({"fast": fast, "slow": slow}, {}, runs=40, warmup=2, threads=1)
    assert timings["fast"].runs == 40 and timings["slow"].runs == 40
    assert timings["fast"].ci_low_ms <= timings["fast"].p50_ms <= timings["fast"].ci_high_ms
    assert significantly_faster(timings["fast"], timings["slow"], 0.05)
    assert not significantly_faster(timings["slow"], timings["fast"])


def test_slow_sets_get_fewer_runs_within_the_time_budget():
    calls = {"n": 0}

    def slowish(_):
        calls["n"] += 1
        time.sleep(0.01)

    timings = time_interleaved({"a": slowish}, {}, runs=1000, warmup=10, threads=1, max_seconds=0.5)
    assert 10 <= timings["a"].runs < 100 and calls["n"] < 120


def test_runner_lifecycle():
    opened = []

    class Probe(BaseRunner):
        ran_as = None

        def _open(self):
            opened.append(self.name)

        def _run(self, feeds):
            return [feeds["x"] * 2]

    runner = Probe("p")
    with pytest.raises(RuntimeError, match="not open"):
        runner.run({"x": np.ones(1)})
    with runner as r:
        assert r.run({"x": np.ones(2)})[0].tolist() == [2.0, 2.0]
    assert opened == ["p"] and not runner._is_open
    runner.close()  # idempotent
    local = LocalRunner("l", lambda: type("S", (), {"run": lambda self, f: [1], "ran_as": "bf16"})())
    with local:
        assert local.run({}) == [1] and local.ran_as == "bf16"
    assert local.session is None


def test_too_few_runs_never_separate():
    from dlopt.measure.timing import Timing

    fast = Timing(1.0, 1.0, 1.0, 1.0, 0.99, 1.01, 0.0, 5, 1, 1)
    slow = Timing(2.0, 2.0, 2.0, 2.0, 1.99, 2.01, 0.0, 5, 1, 1)
    assert not significantly_faster(fast, slow)
    assert significantly_faster(Timing(1.0, 1.0, 1.0, 1.0, 0.99, 1.01, 0.0, 20, 1, 1),
                                Timing(2.0, 2.0, 2.0, 2.0, 1.99, 2.01, 0.0, 20, 1, 1))


def test_ran_as_is_required_of_every_runner():
    class NoRanAs(BaseRunner):
        def _open(self):
            pass

        def _run(self, feeds):
            return []

    with pytest.raises(TypeError, match="ran_as"):
        NoRanAs("n")


def test_the_base_runner_checks_feeds_against_its_inputs():
    """Input metadata and checks live in the base class: any runner given ``inputs`` refuses a wrong feed
    in one line (the same DataError ``dlopt.load``'s runner raises), before its runtime sees it."""
    from dlopt.core.errors import DataError
    from dlopt.measure.runner import TensorSpec

    seen = []
    spec = TensorSpec("x", np.dtype("float32"), ("N", 3))
    local = LocalRunner("ort/fp32", lambda: type("S", (), {"run": lambda self, f: seen.append(f) or [1]})(),
                        inputs=[spec])
    with local:
        with pytest.raises(DataError, match=r"^input 'x' has shape \[2, 4\]; dimension 1 must be 3; ort/fp32 "
                                            r"takes x: float32\[N,3\]$"):
            local.run({"x": np.zeros((2, 4), np.float32)})
        with pytest.raises(DataError, match="^missing input 'x'"):
            local.run({})
        assert seen == []
        assert local.run({"x": np.zeros((2, 3), np.float32)}) == [1] and len(seen) == 1


def test_quick_estimates_and_interleaved_timing_take_runners():
    from dlopt.measure.timing import CallableRunner, as_runner, quick_ms, run_ms

    calls = []

    def sleep(feed):
        calls.append(1)
        time.sleep(0.002)

    runner = as_runner("s", sleep)
    assert isinstance(runner, CallableRunner) and not runner.reopens and runner.ran_as is None
    with runner:
        assert 1.9 <= run_ms(runner, {}) < 50
        assert 1.9 <= quick_ms(runner, {}, runs=3) < 50
    assert len(calls) == 4


def test_what_fits_the_timing_budget_is_a_function_of_values():
    from dlopt.measure.timing import RunPlan, fit_budget

    assert fit_budget(0.001, 100, 10, 5, 0.0, 30.0) == RunPlan(100, 10, 10, 5, 2)
    # opening costs 0.2 s a time: a quarter of a 1 s budget pays one reopening (two sessions)
    assert fit_budget(0.001, 40, 2, 5, 0.2, 1.0) == RunPlan(40, 2, 4, 2, 2)
    # 10 ms a round cannot give 1000 runs in 0.5 s: 49 runs, one warm-up run, blocks of 4
    assert fit_budget(0.01, 1000, 10, 1, 0.0, 0.5) == RunPlan(49, 1, 4, 1, 10)
    # never under MIN_RUNS, however slow
    assert fit_budget(1.0, 100, 10, 1, 0.0, 0.5).runs == 20
