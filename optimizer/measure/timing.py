"""Sound latency comparison: runners with a lifecycle, interleaved timing, intervals of the median.

Shared machines drift (other jobs, frequency scaling).  Timing candidates one after
the other lets that drift decide the winner, so every finalist, the original
included, is timed in round-robin blocks within one process: each round runs a
block of each runner, in a rotating order, each block after a short pause and one
untimed run.  Each gets a 95% interval of its median
from order statistics, and the run-to-run noise (coefficient of variation of its
per-round medians) says how far the machine can be trusted.

One session's speed is not another's: the same ORT session of a Fashion-MNIST CNN ran
0.10 ms in ten openings and 0.17 ms in two (thread placement, arena alignment), and one
compile's verdict flipped on which it drew.  So a :class:`BaseRunner` is opened afresh
``SESSIONS`` times across the rounds (the runs split between its sessions), and its
interval also spans the interval of its per-session medians: a verdict rests on the
model and the machine, not on one session.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping

import numpy as np

try:  # inside dlopt; run_candidates.py (this file pasted into a script) may have no dlopt to import
    from dlopt.core.errors import DataError
except ImportError:  # pragma: no cover - the standalone script
    class DataError(ValueError):
        """A feed the runner cannot take."""

Feed = dict[str, np.ndarray]

# Above this run-to-run variation the report warns that the machine is too noisy to decide.
NOISY_CV = 0.10
# Pause before each block: ONNX Runtime's and OpenVINO's worker threads spin for a while after a run,
# and on a 2-core machine they steal the next runtime's cores (OpenVINO's cv fell from 1.5 to 0.25).
BLOCK_GAP_S = 0.02
# Differences below this are below what a Python harness resolves between runs: the same 15 us
# model measured 10% faster, then 10% slower than its twin in three consecutive compiles.
RESOLUTION_MS = 0.005
# Below this many runs the order-statistic interval is no 95% interval (with 3 runs it is the whole
# range, and two equal models' ranges separate one time in ten): fewer runs only ever tie.
MIN_RUNS = 20
Z95 = 1.959964
# Seconds the interleaved timing of all finalists may take together (CompileConfig.timing.timing_budget_s,
# --timing-budget): a set too slow for the runs asked gets fewer, never under MIN_RUNS, and says so.
TIMING_BUDGET_S = 30.0
# Sessions each BaseRunner is timed through (opened afresh between them, the runs split among them).  With
# five, the order-statistic interval of their medians is their range (93.75% coverage), and a runner
# that draws its slow mode one session in six shows it in more than half of compiles.
SESSIONS = 5
# At most this share of the timing budget goes on opening sessions again (OpenVINO compiles, TVM
# loads); dearer ones get fewer sessions, down to one.
REOPEN_SHARE = 0.25


class BaseRunner(abc.ABC):
    """Runs feeds through one artefact (Polygraphy's runner): ``open`` → ``run``… → ``close`` (a context manager too).

    ``inputs``/``outputs`` say what it takes and gives (specs with ``name``, ``dtype``, ``shape`` and
    ``describe()``; symbolic dimensions are strings): when ``inputs`` is known, every feed is checked
    against it before the runtime sees it, and a wrong one is refused in one line (DataError).
    Subclasses implement ``_open``/``_run``/``_close`` and ``ran_as``; the public methods keep the
    lifecycle honest (run before open is an error, close is idempotent).
    """

    reopens = True  # time_interleaved may close it and open a new session between spans

    def __init__(self, name: str, *, inputs=(), outputs=()) -> None:
        self.name = name
        self.inputs, self.outputs = list(inputs), list(outputs)
        self._is_open = False
        self.open_s = 0.0  # seconds the last open took: the price of timing through another session

    @property
    @abc.abstractmethod
    def ran_as(self) -> str | None:
        """The precision the runtime executes in, where it says (None: it does not)."""

    def open(self) -> "BaseRunner":
        if not self._is_open:
            start = time.perf_counter()
            self._open()
            self.open_s = time.perf_counter() - start
            self._is_open = True
        return self

    def reopen(self) -> "BaseRunner":
        """Close the session and open a new one (the next sample of the session's speed)."""
        self.close()
        return self.open()

    def run(self, feeds: Feed) -> list[np.ndarray]:
        if not self._is_open:
            raise self._not_open()
        return self._run(self.checked(feeds) if self.inputs else feeds)

    def close(self) -> None:
        if self._is_open:
            self._is_open = False
            self._close()

    def __enter__(self) -> "BaseRunner":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def checked(self, feeds) -> Feed:
        """``feeds`` when they match ``inputs`` (names, numpy arrays, dtypes, ranks, fixed sizes), else DataError."""
        if not isinstance(feeds, Mapping):
            raise DataError(f"feeds must be a dict of arrays keyed by input name, got a {type(feeds).__name__}"
                            f"{self._expects()}")
        names = [s.name for s in self.inputs]
        unknown = [k for k in feeds if k not in names]
        if unknown:
            raise DataError(f"unknown input {unknown[0]!r}{self._expects()}")
        missing = [n for n in names if n not in feeds]
        if missing:
            raise DataError(f"missing input {missing[0]!r}{self._expects()}")
        checked = {}
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray):
                raise DataError(f"input {spec.name!r} is a {type(value).__name__}, not a numpy array"
                                f"{self._expects()}")
            if spec.dtype is not None and value.dtype != spec.dtype:
                raise DataError(f"input {spec.name!r} is {value.dtype.name}; the artefact takes {spec.dtype.name} "
                                f"(convert with .astype){self._expects()}")
            if spec.shape and value.ndim != len(spec.shape):
                raise DataError(f"input {spec.name!r} has {value.ndim} dimensions {list(value.shape)}; the artefact "
                                f"takes {len(spec.shape)}{self._expects()}")
            bad = [i for i, d in enumerate(spec.shape) if isinstance(d, int) and d != value.shape[i]]
            if bad:
                raise DataError(f"input {spec.name!r} has shape {list(value.shape)}; dimension {bad[0]} must be "
                                f"{spec.shape[bad[0]]}{self._expects()}")
            checked[spec.name] = value
        return checked

    def _expects(self) -> str:
        return f"; {self.name} takes " + ", ".join(s.describe() for s in self.inputs)

    def _not_open(self) -> Exception:
        return RuntimeError(f"runner {self.name} is not open")

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _run(self, feeds: Feed) -> list[np.ndarray]: ...

    def _close(self) -> None:
        pass


class LocalRunner(BaseRunner):
    """A runner on this machine around a session factory (a backend's ``load``)."""

    def __init__(self, name: str, factory: Callable[[], object], **specs) -> None:
        super().__init__(name, **specs)
        self._factory = factory
        self.session = None

    @property
    def ran_as(self) -> str | None:
        return getattr(self.session, "ran_as", None)

    def _open(self) -> None:
        self.session = self._factory()

    def _run(self, feeds: Feed) -> list[np.ndarray]:
        return self.session.run(feeds)

    def _close(self) -> None:
        self.session = None  # its worker threads go with it and stop competing with the next


class CallableRunner(BaseRunner):
    """A bare ``run(feed)`` callable as a runner: one session, nothing to open again."""

    reopens = False

    def __init__(self, name: str, call: Callable[[Feed], object]) -> None:
        super().__init__(name)
        self._call = call

    @property
    def ran_as(self) -> str | None:
        return None

    def _open(self) -> None:
        pass

    def _run(self, feeds: Feed):
        return self._call(feeds)


def as_runner(name: str, runner: "BaseRunner | Callable[[Feed], object]") -> BaseRunner:
    return runner if isinstance(runner, BaseRunner) else CallableRunner(name, runner)


def run_ms(runner: BaseRunner, feed: Feed) -> float:
    """Milliseconds of one run of an open runner (a quick estimate's unit, no interval)."""
    start = time.perf_counter()
    runner.run(feed)
    return (time.perf_counter() - start) * 1e3


def quick_ms(runner: BaseRunner, feed: Feed, runs: int = 5) -> float:
    """The median of ``runs`` runs of an open runner: a quick estimate, not a timing to compare on."""
    return float(np.median([run_ms(runner, feed) for _ in range(runs)]))


@dataclass(frozen=True)
class Timing:
    """Latency of one runner at one shape: percentiles, a 95% interval of the median, noise."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    ci_low_ms: float
    ci_high_ms: float
    cv: float  # run-to-run noise: coefficient of variation of the per-round medians
    runs: int
    warmup: int
    threads: int
    runs_requested: int | None = None  # what was asked for; more than ``runs`` when the timing budget cut them
    budget_s: float | None = None  # the timing budget the runs were fitted into
    sessions: int | None = None  # sessions the runs were split among (the interval spans their medians)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, latency: Mapping) -> "Timing":
        """The Timing of a report's latency object (its other keys, such as ``speedup_ci``, left out)."""
        return cls(**{f.name: latency[f.name] for f in fields(cls) if f.name in latency})

    @property
    def cut(self) -> str | None:
        """Says so when the timing budget left fewer runs than were asked for (None when it did not)."""
        if self.runs_requested is None or self.runs >= self.runs_requested:
            return None
        return (f"{self.runs} of {self.runs_requested} runs: the timing budget of {self.budget_s:g} s was reached; "
                f"--timing-budget S to change")

    @classmethod
    def from_samples(cls, ms: np.ndarray, rounds: list[np.ndarray], *, warmup: int, threads: int,
                     runs_requested: int | None = None, budget_s: float | None = None,
                     sessions: list[np.ndarray] | None = None) -> "Timing":
        """``rounds``: the timed blocks; ``sessions``: the runs of each session (None: one session)."""
        low, high = session_interval(sessions) if sessions and len(sessions) > 1 else median_interval(ms)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        medians = np.array([np.median(r) for r in rounds if len(r)])
        cv = float(np.std(medians) / np.mean(medians)) if len(medians) > 1 and np.mean(medians) > 0 else 0.0
        return cls(float(p50), float(p90), float(p99), float(ms.mean()), low, high, cv, int(len(ms)), warmup, threads,
                   runs_requested, budget_s, len(sessions) if sessions else 1)

    @classmethod
    def from_device(cls, per_run_ms: np.ndarray, *, warmup: int, threads: int) -> "Timing":
        """A timing from runs a device measured itself (TVM's time evaluator over RPC), in the blocks
        :func:`time_interleaved` would have timed (10 per run count's tenth, at most 10 runs each)."""
        runs = len(per_run_ms)
        block = max(1, min(10, runs // 10))
        rounds = [per_run_ms[i:i + block] for i in range(0, runs, block)]
        return cls.from_samples(per_run_ms, rounds, warmup=warmup, threads=threads)


def median_interval(samples: np.ndarray, z: float = Z95) -> tuple[float, float]:
    """Distribution-free interval of the median from order statistics (binomial, normal approximation)."""
    ordered = np.sort(np.asarray(samples, dtype=np.float64))
    n = len(ordered)
    if n == 0:
        return math.nan, math.nan
    half = z * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return float(ordered[lo]), float(ordered[hi])


def session_interval(sessions: list[np.ndarray], z: float = Z95) -> tuple[float, float]:
    """The interval of the median of all runs, widened to the interval of the per-session medians.

    The first covers the runs of the sessions drawn; the second the spread between sessions (with
    up to five sessions it is their whole range), so two candidates separate only when every
    session of one beat every session of the other as well as their runs did.
    """
    low, high = median_interval(np.concatenate(sessions), z)
    medians = [float(np.median(s)) for s in sessions if len(s)]
    if len(medians) < 2:
        return low, high
    s_low, s_high = median_interval(np.array(medians), z)
    return min(low, s_low), max(high, s_high)


def significantly_faster(a: Timing, b: Timing, min_gain: float = 0.0) -> bool:
    """``a`` beats ``b``: both had ``MIN_RUNS``, the intervals of their medians separate, and ``a``
    gains at least ``min_gain`` and at least ``RESOLUTION_MS``."""
    return (min(a.runs, b.runs) >= MIN_RUNS and a.ci_high_ms < b.ci_low_ms
            and a.p50_ms <= b.p50_ms * (1 - min_gain) and b.p50_ms - a.p50_ms >= RESOLUTION_MS)


@dataclass(frozen=True)
class RunPlan:
    """What fits the timing budget: runs and warm-up runs per runner, runs per block, sessions (spans)."""

    runs: int
    warmup: int
    block: int
    spans: int
    rewarm: int  # untimed runs of each new session: its first-run effects


def fit_budget(round_s: float, runs: int, warmup: int, sessions: int, opening_s: float,
               max_seconds: float) -> RunPlan:
    """``round_s``: one run of every runner; ``opening_s``: opening every reopening runner once more.
    Sessions dear to open get fewer (at most REOPEN_SHARE of the budget goes on opening); a slow set gets
    fewer runs, never under MIN_RUNS."""
    block = max(1, min(10, runs // 10))
    spans = max(1, min(sessions, math.ceil(runs / block)))
    while spans > 1 and (spans - 1) * opening_s > REOPEN_SHARE * max_seconds:
        spans -= 1
    rewarm = max(2, warmup // spans)
    left = max_seconds - (spans - 1) * opening_s
    if round_s * (warmup + runs + (spans - 1) * rewarm) > left:
        scale = left / (round_s * (warmup + runs + (spans - 1) * rewarm))
        runs = max(min(runs, MIN_RUNS), int(runs * scale))  # fewer could never show a difference
        warmup = min(warmup, max(1, int(warmup * scale)))
        block = max(1, min(10, runs // 10))
        spans = min(spans, math.ceil(runs / block))
    return RunPlan(runs, warmup, block, spans, rewarm)


def _next_sessions(runners: Mapping[str, BaseRunner], feed: Feed, rewarm: int, by_session: dict) -> float:
    """Each runner through a new session, warmed by ``rewarm`` untimed runs; the seconds opening took."""
    spent = 0.0
    for name, runner in runners.items():
        runner.reopen()
        spent += runner.open_s
        for _ in range(rewarm):
            runner.run(feed)
        by_session[name].append([])
    return spent


def time_interleaved(
    runners: Mapping[str, "Callable[[Feed], object] | BaseRunner"],
    feed: Feed,
    *,
    runs: int,
    warmup: int,
    threads: int,
    max_seconds: float = TIMING_BUDGET_S,
    progress: Callable[[int, int], None] | None = None,
    meters: Mapping[str, object] | None = None,
    sessions: int | None = None,
) -> dict[str, Timing]:
    """Time every runner on ``feed`` in rotating round-robin blocks; ``runs`` timed runs each.

    A :class:`BaseRunner` is timed through ``sessions`` (default ``SESSIONS``) sessions: the rounds
    fall into that many spans, and between spans each runner is closed and opened again, so its
    interval includes the spread between sessions; ``runs`` stays the total per runner.  A bare
    callable becomes a :class:`CallableRunner`: one session.  Slow sets get fewer runs (at
    least MIN_RUNS each) and sessions dear to open get fewer sessions, so the whole comparison
    stays within about ``max_seconds``; each Timing says how many runs were timed of how many
    asked for (``Timing.cut``) and in how many sessions.  ``meters`` (energy accounts, context
    managers) wrap each runner's timed blocks.
    """
    names = list(runners)
    if not names:
        return {}
    runners = {name: as_runner(name, r) for name, r in runners.items()}
    for runner in runners.values():
        runner.open()  # idempotent: the caller's open stands
    reopened = {name: r for name, r in runners.items() if r.reopens}
    calls = {name: r.run for name, r in runners.items()}
    requested = runs
    # one run each: the cost of a round, and the first-run effects out of the way
    round_s = sum(run_ms(runners[name], feed) for name in names) / 1e3
    fit = fit_budget(round_s, runs, warmup, (SESSIONS if sessions is None else sessions) if reopened else 1,
                     sum(r.open_s for r in reopened.values()), max_seconds)
    runs, warmup, block, spans = fit.runs, fit.warmup, fit.block, fit.spans
    for _ in range(warmup):
        for name in names:
            calls[name](feed)
    rounds = math.ceil(runs / block)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    by_session: dict[str, list[list[np.ndarray]]] = {name: [[]] for name in names}
    done = 0
    span = 0
    spent = 0.0  # seconds spent opening sessions again
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r * spans // rounds > span:  # the next span: every BaseRunner through a new session
            span = r * spans // rounds
            # a session opened cheaply the first time (handed over already loaded) may open dearly now
            if spent + sum(reopened[n].open_s for n in reopened) <= REOPEN_SHARE * max_seconds:
                spent += _next_sessions({n: reopened[n] for n in order if n in reopened}, feed, fit.rewarm, by_session)
        count = min(block, runs - r * block)
        for name in order:
            times = np.empty(count)
            run = calls[name]
            time.sleep(BLOCK_GAP_S)  # let the previous runtime's spinning threads go idle
            run(feed)  # untimed: wakes this runtime's threads after the others ran
            with (meters or {}).get(name) or contextlib.nullcontext():
                for i in range(count):
                    start = time.perf_counter()
                    run(feed)
                    times[i] = time.perf_counter() - start
            samples[name].append(times * 1e3)
            by_session[name][-1].append(times * 1e3)
        done += count
        if progress is not None:
            progress(done, runs)
    return {name: Timing.from_samples(np.concatenate(samples[name]), samples[name], warmup=warmup, threads=threads,
                                      runs_requested=requested, budget_s=max_seconds,
                                      sessions=[np.concatenate(s) for s in by_session[name] if s])
            for name in names}
