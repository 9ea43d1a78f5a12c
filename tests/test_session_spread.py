"""One session's speed is not another's: a BaseRunner is timed through several sessions, and its interval spans them.

The runners here differ between sessions on purpose: one sleeps 2 ms a run in odd sessions and 8 ms in
even ones (a session's speed is bimodal: thread placement, arena alignment), one sleeps 4 ms in every session.
The first two tests judge the interval arithmetic across sessions, so they run on a virtual clock: the
runner's sleep advances it and time_interleaved reads it, exactly 2, 4 and 8 ms a run. On real sleeps a loaded
CI machine (four test workers on two cores) stretched one whole session of the steady runner's 4 ms to 6 ms and
failed the test on the scheduler, not on the code. The budget tests below keep the real clock: their subject
is wall time.
"""

from __future__ import annotations

import time

import numpy as np

import pytest

from dlopt.measure import timing as timing_module
from dlopt.measure.timing import SESSIONS, BaseRunner, median_interval, significantly_faster, time_interleaved

FAST_S, SLOW_S, STEADY_S = 0.002, 0.008, 0.004


class VirtualClock:
    """perf_counter and sleep for time_interleaved: sleeping advances the clock, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    virtual = VirtualClock()
    monkeypatch.setattr(timing_module, "time", virtual)
    return virtual


class Sleeper(BaseRunner):
    """Sleeps ``odd_s`` a run in its 1st, 3rd, 5th… session and ``even_s`` in the others; counts its opens."""

    def __init__(self, name: str, odd_s: float, even_s: float, open_s: float = 0.0, sleep=time.sleep) -> None:
        super().__init__(name)
        self.odd_s, self.even_s, self.open_cost = odd_s, even_s, open_s
        self.opens = 0
        self.sleep = sleep

    ran_as = None  # a required property of every runner

    def _open(self) -> None:
        self.opens += 1
        self.sleep(self.open_cost)

    def _run(self, feeds):
        self.sleep(self.odd_s if self.opens % 2 else self.even_s)
        return []


def test_the_interval_widens_to_cover_sessions_that_differ_and_stays_narrow_when_they_do_not(clock):
    alternating = Sleeper("alternating", FAST_S, SLOW_S, sleep=clock.sleep)
    steady = Sleeper("steady", STEADY_S, STEADY_S, sleep=clock.sleep)
    timings = time_interleaved({"alternating": alternating, "steady": steady}, {}, runs=50, warmup=2, threads=1)
    alt, std = timings["alternating"], timings["steady"]
    # five sessions each, opened in turn across the rounds; --runs stays the total per runner
    assert alternating.opens == steady.opens == SESSIONS == 5
    assert (alt.runs, alt.sessions, std.runs, std.sessions) == (50, 5, 50, 5)
    # the alternating runner's interval spans both kinds of session: 2 ms and 8 ms a run
    assert alt.ci_low_ms == pytest.approx(FAST_S * 1e3, abs=1e-6), alt
    assert alt.ci_high_ms == pytest.approx(SLOW_S * 1e3, abs=1e-6), alt
    # a runner whose sessions are alike keeps its interval at its 4 ms
    assert std.ci_low_ms <= std.p50_ms <= std.ci_high_ms and std.ci_high_ms - std.ci_low_ms < 1e-6, std
    assert std.p50_ms == pytest.approx(STEADY_S * 1e3, abs=1e-6)
    assert std.ci_high_ms - std.ci_low_ms < (alt.ci_high_ms - alt.ci_low_ms) / 4
    # so neither is called faster: which kind of session the alternating one drew decides nothing
    assert not significantly_faster(alt, std) and not significantly_faster(std, alt)


def test_one_session_would_have_called_the_alternating_runner_faster(clock):
    """What the timing did before: each runner timed through its one (first, fast) session; the
    alternating runner 'beat' the steady one, a verdict its next session would have reversed."""
    alternating = Sleeper("alternating", FAST_S, SLOW_S, sleep=clock.sleep)
    steady = Sleeper("steady", STEADY_S, STEADY_S, sleep=clock.sleep)
    timings = time_interleaved({"alternating": alternating, "steady": steady}, {}, runs=50, warmup=2, threads=1,
                               sessions=1)
    alt, std = timings["alternating"], timings["steady"]
    assert alternating.opens == steady.opens == 1 and alt.sessions == std.sessions == 1
    assert alt.ci_high_ms < SLOW_S * 1e3 * 0.5  # the slow sessions are nowhere in its interval
    assert significantly_faster(alt, std)
    # a bare callable is one session too: nothing to open again
    bare = time_interleaved({"alternating": alternating.run}, {}, runs=30, warmup=1, threads=1)["alternating"]
    assert bare.sessions == 1 and alternating.opens == 1


def test_the_interval_of_per_session_medians_is_their_range_with_five_sessions():
    rng = np.random.default_rng(0)
    sessions = [rng.normal(mu, 0.01, 40) for mu in (1.0, 1.0, 1.6, 1.0, 1.0)]
    from dlopt.measure.timing import session_interval

    low, high = session_interval(sessions)
    medians = [np.median(s) for s in sessions]
    assert (low, high) == (min(min(medians), median_interval(np.concatenate(sessions))[0]), max(medians))
    assert high > 1.55 and low < 1.01
    alike = [rng.normal(1.0, 0.01, 40) for _ in range(5)]
    a_low, a_high = session_interval(alike)
    p_low, p_high = median_interval(np.concatenate(alike))
    assert a_high - a_low < 0.02 and a_high - a_low < 3 * (p_high - p_low)


def test_sessions_dear_to_open_get_fewer_within_the_timing_budget():
    # opening costs 0.2 s: at most a quarter of a 1 s budget goes on opening again, so one reopening
    dear = Sleeper("dear", STEADY_S, STEADY_S, open_s=0.2)
    dear.open()
    start = time.perf_counter()
    timing = time_interleaved({"dear": dear}, {}, runs=40, warmup=2, threads=1, max_seconds=1.0)["dear"]
    elapsed = time.perf_counter() - start
    assert dear.opens == 2 and timing.sessions == 2 and timing.runs == 40
    assert elapsed < 1.5, elapsed
    dear.close()


def test_a_session_handed_over_open_that_is_dear_to_open_again_stops_being_reopened():
    # the gate hands time_interleaved artefacts it loaded already: their first open cost nothing here,
    # opening again costs 0.2 s; a quarter of a 1 s budget pays one reopening, not four
    class HandedOver(Sleeper):
        def _open(self) -> None:
            self.opens += 1
            time.sleep(0 if self.opens == 1 else 0.2)

    runner = HandedOver("handed", STEADY_S, STEADY_S)
    timing = time_interleaved({"handed": runner}, {}, runs=40, warmup=2, threads=1, max_seconds=1.0)["handed"]
    assert runner.opens == 2 and timing.sessions == 2 and timing.runs == 40
    runner.close()
