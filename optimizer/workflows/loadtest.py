"""Load tests against a KServe V2 server (Triton, ``dlopt serve``): closed-loop concurrency and open-loop rates.

Closed loop (``run_closed``): N workers, each with its own tritonclient HTTP client (it is not
thread-safe), each sends the next request when the last one answered.  This is what a benchmark
usually does, and it hides queueing: a slow answer delays the next send, so the requests that
would have waited are never sent (coordinated omission).

Open loop (``run_open``): requests are due on a schedule (constant or seeded Poisson arrivals at
``rate`` per second) and a pool of senders sends each when it is due, whether or not earlier ones
answered; the pool grows by one sender (up to ``MAX_SENDERS``) whenever a request finds every sender
busy.  Latency is measured from the time a request was *due*, so a queue anywhere (the server's or
the client's own) shows in the percentiles.  A request that no sender was free to send when it was
due is ``late``; one still unsent ``UNSENT_AFTER_S`` after the level's time is up (a backlog is sent
for that long, not for ever) is ``unsent``, and the level holds no objective.

A level runs ``warmup`` seconds uncounted, then ``duration`` seconds counted: ``requests`` are
those sent in the counted window (answered + errors; open loop: ``due`` = requests + unsent),
``throughput`` the answered ones per second of that window (it runs to the last answer), the
percentiles numpy's (linear interpolation) over the answered ones' latencies.
Every network call has a deadline (``timeout``): a level ends by ``warmup + duration + timeout``.

Only dlopt's core and calibration layers are used here (inputs, shapes, the ``.npz`` reader), so the
module can serve the CLI and a batching tuner alike.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from dlopt.core.errors import ConfigError
from dlopt.workflows.loadtest_target import (DEFAULT_TIMEOUT_S, Client, Model, Requests,  # noqa: F401 - the API
                                             check_request, check_url, npz_feeds, random_feeds, resolve_model)

LATE_S = 0.001  # picked up by a sender more than this after it was due: no sender was free
UNSENT_AFTER_S = 1.0  # a level's backlog is sent for at most this long (or its duration) after it ends
MAX_CONCURRENCY = 1024
MAX_RATE = 100_000.0
MAX_SENDERS = 128
ARRIVALS = ("poisson", "constant")
_PERCENTILES = ("p50", "p95", "p99", "max")


@dataclass(frozen=True)
class Level:
    """One load level's result; ``concurrency`` or ``rate`` says which loop ran."""

    concurrency: int | None
    rate: float | None
    requests: int  # sent in the counted window: answered + errors
    answered: int
    errors: int  # error answers and requests past their deadline
    seconds: float  # the counted window, to the last answer
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    due: int | None = None  # open loop: due in the counted window: requests + unsent
    late: int | None = None  # open loop: sent after they were due because no sender was free
    unsent: int | None = None  # open loop: still unsent when the level's time was up
    senders: int | None = None  # open loop: the senders the pool grew to
    first_error: str | None = None

    @property
    def throughput(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.rate is None else f"rate {self.rate:g}/s"

    def to_dict(self) -> dict:
        load = {"concurrency": self.concurrency} if self.rate is None else {"rate": self.rate}
        row = {**load, "requests": self.requests, "answered": self.answered, "throughput": round(self.throughput, 2),
               **{f"{p}_ms": getattr(self, f"{p}_ms") for p in _PERCENTILES}, "errors": self.errors}
        if self.rate is not None:
            row.update(due=self.due, late=self.late, unsent=self.unsent, senders=self.senders)
        row["seconds"] = round(self.seconds, 3)
        if self.first_error:
            row["first_error"] = self.first_error
        return row


# -- objectives -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slo:
    """Latency objectives: (percentile, milliseconds) pairs, e.g. (("p99", 20.0),)."""

    limits: tuple[tuple[str, float], ...]

    def describe(self) -> str:
        return ", ".join(f"{p} <= {ms:g} ms" for p, ms in self.limits)


def parse_slo(text: str) -> Slo:
    """``p99=20ms`` or ``p50=5ms,p99=0.02s`` (p50, p95, p99 or max; ms or s)."""
    limits = []
    for term in text.split(","):
        match = re.fullmatch(r"\s*(p50|p95|p99|max)\s*=\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(ms|s)\s*", term, re.I)
        if not match:
            raise ConfigError(f"--slo takes PERCENTILE=TIME with p50, p95, p99 or max and a unit ms or s "
                              f"(e.g. p99=20ms or p95=10ms,p99=0.05s), got {text!r}")
        value = float(match.group(2)) * (1000.0 if match.group(3).lower() == "s" else 1.0)
        if value <= 0:
            raise ConfigError(f"--slo {term.strip()}: the objective must be above 0")
        limits.append((match.group(1).lower(), value))
    return Slo(tuple(limits))


def holds(level: Level, slo: Slo) -> bool:
    """Every objective met, something answered, no errors and (open loop) nothing left unsent."""
    if level.answered == 0 or level.errors or level.unsent:
        return False
    return all(getattr(level, f"{p}_ms") <= ms for p, ms in slo.limits)


def best(levels: Sequence[Level], slo: Slo) -> Level | None:
    """The level that holds ``slo`` with the most throughput (closed loop) or the highest rate (open loop)."""
    held = [lv for lv in levels if holds(lv, slo)]
    if not held:
        return None
    return max(held, key=lambda lv: (lv.rate if lv.rate is not None else -1.0, lv.throughput))


def parse_levels(text: str, flag: str, kind: type) -> tuple:
    """``1,2,4`` for ``--concurrency`` (integers) or ``10,50.5`` for ``--rate``; a ConfigError otherwise."""
    example = "1,2,4,8,16" if kind is int else "50,100,200"
    try:
        values = tuple(kind(v) for v in text.split(","))
    except ValueError:
        values = ()
    top = MAX_CONCURRENCY if kind is int else MAX_RATE
    if not values or any(not (0 < v <= top) or v != v for v in values):
        raise ConfigError(f"{flag} takes comma-separated numbers above 0 and at most {top:g} (e.g. {example}), "
                          f"got {text!r}")
    return values


@dataclass
class _Record:
    due: float  # offset from the level's start: when it was sent (closed) or due (open)
    done: float
    error: str | None
    late: bool = False


def _check_run(duration: float, warmup: float, timeout: float) -> None:
    if not duration > 0 or not warmup >= 0 or not timeout > 0:
        raise ConfigError(f"duration must be above 0, warm-up at least 0 and timeout above 0 seconds, got "
                          f"{duration}, {warmup} and {timeout}")


class _Pool:
    """Threads from one start, each with its own client, running ``work(client, start, halt, pool)``; more join
    (up to ``most``) when a worker calls ``add``.  ``halt`` is set when ``stop`` is, when the deadline passes
    and on an interrupt; each thread closes its own client."""

    def __init__(self, url: str, requests: Requests, timeout: float, work: Callable, most: int) -> None:
        self.url, self.requests, self.timeout, self.work, self.most = url, requests, timeout, work, most
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.results: list[list[_Record]] = []
        self.start = 0.0

    def add(self) -> None:
        with self.lock:
            if len(self.threads) >= self.most or self.halt.is_set():
                return
            index = len(self.threads)
            self.results.append([])
            thread = threading.Thread(target=self._body, args=(index,), name=f"dlopt-load-{index}", daemon=True)
            self.threads.append(thread)
        thread.start()

    def _body(self, index: int) -> None:
        client = Client(self.url, self.requests, self.timeout)
        try:
            self.results[index] = self.work(client, self.start, self.halt, self)
        finally:
            client.close()

    def run(self, initial: int, stop: threading.Event | None, deadline: float) -> list[_Record]:
        self.start = time.perf_counter() + 0.1
        for _ in range(initial):
            self.add()
        try:
            while time.perf_counter() < self.start + deadline:
                with self.lock:
                    alive = [t for t in self.threads if t.is_alive()]
                if not alive:
                    break
                if stop is not None and stop.is_set():
                    self.halt.set()
                alive[0].join(0.1)  # short waits: a signal handler runs in between
        finally:
            self.halt.set()  # workers stop at their next step; one in flight ends by its own deadline
            for thread in list(self.threads):
                thread.join(max(0.0, self.start + deadline - time.perf_counter()))
        return [r for rs in self.results for r in rs]


def _level(records: Sequence[_Record], *, warmup: float, duration: float, concurrency: int | None = None,
           rate: float | None = None, due: int | None = None, senders: int | None = None) -> Level:
    counted = [r for r in records if r.due >= warmup]
    answered = np.array([r.done - r.due for r in counted if r.error is None]) * 1000.0
    errors = [r.error for r in counted if r.error is not None]
    last = max((r.done for r in counted), default=warmup + duration)
    seconds = max(last, warmup + duration) - warmup
    stats = (np.percentile(answered, [50, 95, 99]).tolist() + [float(answered.max())]) if answered.size \
        else [None] * 4
    p50, p95, p99, top = (None if v is None else round(float(v), 3) for v in stats)
    open_loop = rate is not None
    return Level(concurrency, rate, len(counted), int(answered.size), len(errors), seconds, p50, p95, p99, top,
                 due=due, late=sum(r.late for r in counted) if open_loop else None,
                 unsent=(due - len(counted)) if open_loop else None, senders=senders,
                 first_error=errors[0] if errors else None)


def run_closed(url: str, model: Model | str, feeds: Sequence[Mapping[str, np.ndarray]], concurrency: int,
               duration: float, warmup: float, *, timeout: float = DEFAULT_TIMEOUT_S,
               stop: threading.Event | None = None) -> Level:
    """``concurrency`` workers, each sending its next request when its last one answered."""
    url, model = check_url(url), model if isinstance(model, Model) else resolve_model(url, model)
    _check_run(duration, warmup, timeout)
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ConfigError(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
    end = warmup + duration

    def work(sender: Client, start: float, halt: threading.Event, pool: _Pool) -> list[_Record]:
        records = []
        halt.wait(max(0.0, start - time.perf_counter()))
        while not halt.is_set():
            sent = time.perf_counter() - start
            if sent >= end:
                break
            error = sender.send()
            records.append(_Record(sent, time.perf_counter() - start, error))
        return records

    pool = _Pool(url, Requests.prepare(model, feeds), timeout, work, concurrency)
    records = pool.run(concurrency, stop, end + timeout + 5.0)
    return _level(records, warmup=warmup, duration=duration, concurrency=concurrency)


def schedule(rate: float, seconds: float, arrival: str = "poisson", seed: int = 0) -> np.ndarray:
    """When each request is due (seconds from the start, below ``seconds``): every 1/rate s, or Poisson."""
    if arrival == "constant":
        return np.arange(0.0, seconds, 1.0 / rate)
    if arrival != "poisson":
        raise ConfigError(f"--arrival is one of {', '.join(ARRIVALS)}, got {arrival!r}")
    # each rate its own draws: one seed for all would give every level the same arrivals, scaled (its lulls too)
    rng = np.random.default_rng((seed, round(rate * 1000)))
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 1.2) + 16)
    times = np.cumsum(gaps) - gaps[0]  # the first request is due at the start
    while times[-1] < seconds:
        more = rng.exponential(1.0 / rate, size=len(gaps))
        times = np.concatenate([times, times[-1] + np.cumsum(more)])
    return times[times < seconds]


def run_open(url: str, model: Model | str, feeds: Sequence[Mapping[str, np.ndarray]], rate: float,
             duration: float, warmup: float, arrival: str = "poisson", seed: int = 0, *,
             timeout: float = DEFAULT_TIMEOUT_S, senders: int | None = None,  # at the start; None: from the rate
             stop: threading.Event | None = None) -> Level:
    """Requests due at ``rate`` per second, each sent when due by a free sender; latency from when it was due."""
    url, model = check_url(url), model if isinstance(model, Model) else resolve_model(url, model)
    _check_run(duration, warmup, timeout)
    if not 0 < rate <= MAX_RATE:
        raise ConfigError(f"rate must be above 0 and at most {MAX_RATE:g} requests/s, got {rate}")
    end = warmup + duration
    grace = min(UNSENT_AFTER_S, duration)
    due_at = schedule(rate, end, arrival, seed)
    first = senders or min(MAX_SENDERS, max(4, math.ceil(rate * 0.1)))  # in flight: rate x 100 ms answers
    taken = iter(range(len(due_at)))
    lock = threading.Lock()

    def work(sender: Client, start: float, halt: threading.Event, pool: _Pool) -> list[_Record]:
        records = []
        halt.wait(max(0.0, start - time.perf_counter()))
        while not halt.is_set():
            with lock:
                index = next(taken, None)
            if index is None:
                break
            due = float(due_at[index])
            now = time.perf_counter() - start
            if now >= end + grace:  # the level's time is up: this one and the rest stay unsent
                break
            late = now > due + LATE_S
            if late:
                pool.add()  # every sender was busy: one more, up to MAX_SENDERS
            elif halt.wait(due - now):
                break
            error = sender.send()
            records.append(_Record(due, time.perf_counter() - start, error, late))
        return records

    pool = _Pool(url, Requests.prepare(model, feeds), timeout, work, max(first, MAX_SENDERS))
    records = pool.run(first, stop, end + grace + timeout + 5.0)
    return _level(records, warmup=warmup, duration=duration, rate=rate, due=int(np.sum(due_at >= warmup)),
                  senders=len(pool.threads))


def sweep(url: str, model: Model, feeds: Sequence[Mapping[str, np.ndarray]], *, concurrency: Sequence[int] = (),
          rates: Sequence[float] = (), duration: float = 10.0, warmup: float = 2.0, arrival: str = "poisson",
          seed: int = 0, timeout: float = DEFAULT_TIMEOUT_S, progress: Callable[[str], None] | None = None,
          stop: threading.Event | None = None, levels: list[Level] | None = None) -> list[Level]:
    """Closed-loop levels, then open-loop ones; each appended to ``levels`` as it ends (an interrupted sweep
    keeps the levels it finished there)."""
    levels = [] if levels is None else levels
    runs = [(f"concurrency {n}", lambda n=n: run_closed(url, model, feeds, n, duration, warmup, timeout=timeout,
                                                         stop=stop)) for n in concurrency]
    runs += [(f"rate {r:g}/s", lambda r=r: run_open(url, model, feeds, r, duration, warmup, arrival, seed,
                                                     timeout=timeout, stop=stop)) for r in rates]
    for label, run in runs:
        if stop is not None and stop.is_set():
            break
        if progress:
            progress(f"{label}: {warmup:g} s warm-up, {duration:g} s counted")
        began = time.perf_counter()
        level = run()
        levels.append(level)
        if progress:
            progress(f"{label}: {level.answered} answered, {level.throughput:.1f}/s, p99 {_ms(level.p99_ms)}, "
                     f"{level.errors} errors" + (f", {level.late} late, {level.unsent} unsent"
                                                  if level.rate is not None else "")
                     + f" [{time.perf_counter() - began:.1f} s]"
                     + (f"; first error: {level.first_error}" if level.first_error else ""))
    return levels


def summary(levels: Sequence[Level], slo: Slo) -> list[str]:
    """One line per loop that ran: the level that holds ``slo`` with the most throughput (closed loop) or
    the highest rate that holds it (open loop), or that none does."""
    lines = []
    for closed, loop in ((True, "concurrency"), (False, "rate")):
        ran = [lv for lv in levels if (lv.rate is None) == closed]
        if not ran:
            continue
        found = best(ran, slo)
        if found is None:
            lines.append(f"{slo.describe()}: no {loop} level holds it")
        elif closed:
            lines.append(f"{slo.describe()}: highest throughput that holds it {found.throughput:.1f}/s at "
                         f"concurrency {found.concurrency} (p99 {_ms(found.p99_ms)})")
        else:
            lines.append(f"{slo.describe()}: highest rate that holds it {found.rate:g}/s "
                         f"({found.throughput:.1f}/s answered, p99 {_ms(found.p99_ms)})")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"
