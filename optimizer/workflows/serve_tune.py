"""Batching sized for a latency objective: the served configuration with the most throughput that holds it.

As Triton's Model Analyzer does, on the real server: every configuration of a small grid (dynamic
batching off, or a largest batch × a queue delay; 1 or 2 instances, the cores split between them)
is served afresh by ``dlopt serve``'s server and load-tested in closed loop at rising concurrency
(``dlopt.workflows.loadtest``, single-sample requests: the server forms the batches).  A run's
figure is the throughput of its best level that holds the objective (no errors, every percentile
limit met; 0 when none does).

One measurement per configuration, each at a different time on a machine whose load drifts, is
no comparison (a choice measured at 5.0k requests/s gave 1.8k in a fresh server, batching off
3.5k).  So, as dlopt's own timing does (``dlopt.measure.timing``), every configuration is served
and measured in ``rounds`` rounds, each round in a rotated order (no configuration always first or
last), and its figure is the median of its rounds with their range kept.  ``choose`` then prefers
the simpler configuration (batching off, fewer instances, smaller batches) unless another's rounds
all beat all of its rounds (their ranges are apart, as ``significantly_faster`` wants the intervals
of two timings apart): the simplest configuration no other beats wins, and the result says why.  A looser rule, "the median gain exceeds the overlap of the
ranges", chose one of two identical configurations 20% of the time with 3 rounds (simulated,
log-normal spread), and one of 9 identical contenders over the baseline 61% of the time; apart
ranges: 5% and 23%, and with 5 rounds 0.4% and 3%.  The counted time of a level is split
between the rounds, so more rounds cost server starts, not longer levels.

An artefact whose inputs and outputs have no symbolic batch axis cannot take the batches the
server forms: only unbatched configurations are tried, and the result says why.

``record`` writes the result into the output's report.json (its ``serving`` section: the grid,
every round's levels, the choice and why, the objective and the machine it was measured on) and
renders report.md and report.html again; ``dlopt package --triton`` then writes that dynamic
batching and instance group into config.pbtxt.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dlopt.core.artifacts import output_lock, read_folder_json, resolve_output
from dlopt.core.errors import ConfigError
from dlopt.deploy.serve import ServeOptions, free_ports, served
from dlopt.device.device_check import host_info, write_json, write_text
from dlopt.measure.runner import _specs
from dlopt.report.data import Report
from dlopt.report.html import render_html
from dlopt.report.sections.serving import HEADERS, rows  # noqa: F401 - HEADERS: the table's
from dlopt.targets import read_artifact
from dlopt.workflows.loadtest import Level, Slo, best, random_feeds, resolve_model, sweep

BATCH_SIZES = (4, 16)
QUEUE_DELAYS_US = (500, 2000)
INSTANCES = (1, 2)
CONCURRENCY = (1, 4, 16)
ROUNDS = 3  # each configuration served and measured this many times, in rotated order
MAX_ROUNDS = 20
DURATION_S = 6.0  # a level's counted seconds, split between the rounds
WARMUP_S = 1.0  # each level's uncounted seconds, in every round
SERVER_START_S = 8.0  # starting tritonserver with the Python backend, and draining it, on a loaded 2-core machine


@dataclass(frozen=True)
class ServingConfig:
    max_batch_size: int  # 0: batching off
    max_queue_delay_us: int
    instances: int
    threads: int  # per instance

    @property
    def label(self) -> str:
        batching = (f"batch {self.max_batch_size}, delay {self.max_queue_delay_us} us" if self.max_batch_size
                    else "batching off")
        return f"{batching}, {self.instances} x {self.threads} threads"

    def to_dict(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "max_queue_delay_us": self.max_queue_delay_us,
                "instances": self.instances, "threads": self.threads}


@dataclass(frozen=True)
class Run:
    """One configuration served afresh and loaded once: its place in one round."""

    round: int
    position: int  # its place in that round's order, from 0
    levels: tuple[Level, ...]
    best: Level | None  # the level with the most throughput that holds the objective
    load_average: float | None = None  # the machine's 1-minute load average when the run started

    @property
    def throughput(self) -> float:
        return self.best.throughput if self.best is not None else 0.0

    def to_dict(self) -> dict:
        return {"round": self.round, "position": self.position, "load_average": self.load_average,
                "levels": [lv.to_dict() for lv in self.levels],
                "throughput_at_objective": round(self.throughput, 2) if self.best else None,
                "best_concurrency": self.best.concurrency if self.best else None}


@dataclass(frozen=True)
class Trial:
    """A configuration's runs, one per round: its figure is their median, their range its spread."""

    config: ServingConfig
    runs: tuple[Run, ...]

    @property
    def figures(self) -> list[float]:
        return [r.throughput for r in self.runs]

    @property
    def throughput(self) -> float:
        """The median over the rounds of the throughput at the objective (0 for a round that held nothing)."""
        return float(statistics.median(self.figures)) if self.runs else 0.0

    @property
    def low(self) -> float:
        return min(self.figures, default=0.0)

    @property
    def high(self) -> float:
        return max(self.figures, default=0.0)

    @property
    def held(self) -> int:
        return sum(r.best is not None for r in self.runs)

    @property
    def holds(self) -> bool:
        """It held the objective in more than half of its rounds."""
        return 2 * self.held > len(self.runs)

    @property
    def p99_ms(self) -> float | None:
        """The median p99 of the best levels of the rounds that held the objective."""
        values = [r.best.p99_ms for r in self.runs if r.best is not None and r.best.p99_ms is not None]
        return float(statistics.median(values)) if values else None

    def describe(self) -> str:
        return (f"{self.config.label}: median {self.throughput:.0f}/s ({self.low:.0f}-{self.high:.0f} over "
                f"{len(self.runs)} rounds)")

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "rounds": [r.to_dict() for r in self.runs],
                "held_rounds": self.held,
                "throughput_at_objective": round(self.throughput, 2) if self.holds else None,
                "throughput_low": round(self.low, 2), "throughput_high": round(self.high, 2),
                "p99_ms": self.p99_ms}


def simplicity(config: ServingConfig) -> tuple:
    """Simpler first: batching off, then fewer instances, then smaller batches and shorter queue delays."""
    return (config.max_batch_size > 0, config.instances, config.max_batch_size, config.max_queue_delay_us)


def beats(a: Trial, b: Trial) -> bool:
    """``a`` holds the objective and its range lies above ``b``'s: every round of ``a`` beat every round of ``b``
    (so its median exceeds ``b``'s by more than any overlap of their spreads: there is none)."""
    return a.holds and bool(a.runs) and bool(b.runs) and a.low > b.high


def choose(trials: Sequence[Trial], slo: Slo) -> tuple[Trial | None, str]:
    """The configuration to serve, and why: the simplest of those that hold the objective in most of their
    rounds and that no other such configuration beats (``beats``).  So batching off with one instance
    unless another lies above it, and never a configuration that a simpler one ties with."""
    held = sorted((t for t in trials if t.holds), key=lambda t: simplicity(t.config))
    if not held:
        return None, f"no configuration holds {slo.describe()} in most of its rounds"
    beaten = {id(t): next((d for d in held if beats(d, t)), None) for t in held}
    chosen = next(t for t in held if beaten[id(t)] is None)  # there is one: 'lies above' has no cycles
    top = max(held, key=lambda t: t.throughput)
    if chosen is held[0]:
        why = f"the simplest configuration that holds {slo.describe()}, {chosen.describe()}"
        return chosen, why + (f"; no other's range lies above its range (the highest median, {top.describe()})"
                              if top is not chosen else "")
    simpler = held[:held.index(chosen)]
    beater = beaten[id(held[0])]
    why = (f"{chosen.describe()}, the simplest configuration whose range no other's lies above; "
           f"{held[0].describe()} lies below {'it' if beater is chosen else beater.describe()}")
    if len(simpler) > 1:
        why += f", and {len(simpler) - 1} other simpler one{'s' if len(simpler) > 2 else ''} below another"
    if top is not chosen:
        why += f"; the highest median, {top.describe()}, does not lie above it"
    return chosen, why


@dataclass(frozen=True)
class TuneResult:
    slo: Slo
    trials: tuple[Trial, ...]
    chosen: Trial | None
    batching_off_because: str | None = None
    host: dict = field(default_factory=dict)
    seconds: float = 0.0
    why: str = ""
    orders: tuple[tuple[int, ...], ...] = ()  # per round: the trials' indices in the order they ran
    level_seconds: float = 0.0  # counted seconds of a level in one round
    warmup: float = 0.0

    def to_dict(self) -> dict:
        return {"objective": self.slo.describe(), "measured_on": self.host, "seconds": round(self.seconds, 1),
                "load": (f"closed loop, single-sample requests; {len(self.orders)} rounds in rotated order, "
                         f"{self.warmup:g} s warm-up and {self.level_seconds:g} s counted a level"),
                "batching_off_because": self.batching_off_because, "rounds": len(self.orders),
                "orders": [list(o) for o in self.orders], "rule": RULE,
                "trials": [t.to_dict() for t in self.trials],
                "chosen": self.chosen.config.to_dict() if self.chosen else None,
                "chosen_throughput": round(self.chosen.throughput, 2) if self.chosen else None,
                "why": self.why}


RULE = ("each configuration's figure is the median over its rounds of the throughput of its best level within "
        "the objective; of those that hold it in most rounds, the simplest whose range over the rounds no other's "
        "range lies above wins")


def grid(batchable: bool, cores: int) -> list[ServingConfig]:
    """Batching off first, then largest batch x queue delay; 1 and (with 2+ cores) 2 instances."""
    counts = [n for n in INSTANCES if n <= max(cores, 1)]
    configs = [ServingConfig(0, 0, n, max(cores // n, 1)) for n in counts]
    if batchable:
        configs += [ServingConfig(b, d, n, max(cores // n, 1)) for b in BATCH_SIZES for d in QUEUE_DELAYS_US
                    for n in counts]
    return configs


def orders(count: int, rounds: int) -> list[list[int]]:
    """Each round's order of ``count`` configurations: rotated so that the starts spread over the grid
    (10 configurations in 3 rounds start at 0, 3 and 6), or by one per round when rounds >= count."""
    shifts = [r % count if rounds >= count else r * count // rounds for r in range(rounds)] if count else []
    return [list(range(s, count)) + list(range(s)) for s in shifts]


def batching_blocker(source: Path) -> str | None:
    """Why the server cannot batch this artefact's requests (a fixed first dimension), or None."""
    artifact, root = read_artifact(source)
    inputs, outputs = _specs(artifact, root)
    fixed = [s.name for s in (*inputs, *outputs) if not s.shape or isinstance(s.shape[0], int)]
    if not inputs or fixed:
        return (f"{', '.join(fixed[:4]) or 'the inputs'} have a fixed first dimension: the artefact cannot take "
                f"the batches the server forms (export it with a symbolic batch axis to batch)")
    return None


def cost_s(configs: int, rounds: int = ROUNDS, levels: int = len(CONCURRENCY), duration: float = DURATION_S,
           warmup: float = WARMUP_S, start_s: float = SERVER_START_S) -> float:
    """About how long tuning takes: every configuration started and loaded in every round."""
    return configs * rounds * (start_s + levels * (warmup + duration / rounds))


def tune(source: Path, slo: Slo, *, configs: Sequence[ServingConfig] | None = None,
         concurrency: Sequence[int] = CONCURRENCY, duration: float = DURATION_S, warmup: float = WARMUP_S,
         rounds: int = ROUNDS, stop: threading.Event | None = None,
         progress: Callable[[str], None] | None = None) -> TuneResult:
    """Serve and load-test each configuration in ``rounds`` rotated rounds (``duration``: a level's counted
    seconds over all rounds; ``warmup``: each level's, in every round); the choice by ``choose``."""
    if not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
        raise ConfigError(f"--tune-rounds must be from 1 to {MAX_ROUNDS}, got {rounds}")
    stop = stop or threading.Event()
    began = time.perf_counter()
    blocker = batching_blocker(Path(source))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    configs = list(configs) if configs is not None else grid(blocker is None, cores)
    if blocker and any(c.max_batch_size for c in configs):
        raise ConfigError(f"dynamic batching: {blocker}")
    level_s = duration / rounds
    if progress:
        progress(f"{len(configs)} configurations in {rounds} rounds, {len(concurrency)} levels of {warmup:g} + "
                 f"{level_s:.3g} s each: about {cost_s(len(configs), rounds, len(concurrency), duration, warmup):.0f} s")
    runs: list[list[Run]] = [[] for _ in configs]
    done: list[tuple[int, ...]] = []
    for r, order in enumerate(orders(len(configs), rounds)):
        ran = []
        for position, k in enumerate(order):
            if stop.is_set():
                break
            config = configs[k]
            if progress:
                progress(f"round {r + 1}/{rounds} [{position + 1}/{len(configs)}] {config.label}")
            run = _measure(Path(source), config, slo, concurrency, level_s, warmup, stop, progress)
            if run is None:
                break
            runs[k].append(Run(r, position, *run))
            ran.append(k)
        done.append(tuple(ran))
        if stop.is_set():
            break
    trials = tuple(Trial(c, tuple(rs)) for c, rs in zip(configs, runs))
    chosen, why = choose(trials, slo)
    return TuneResult(slo, trials, chosen, blocker, host_info(), time.perf_counter() - began, why, tuple(done),
                      level_s, warmup)


def _measure(source: Path, config: ServingConfig, slo: Slo, concurrency: Sequence[int], duration: float,
             warmup: float, stop: threading.Event, progress) -> tuple | None:
    """(levels, best, load average) of ``config`` served afresh; None when stopped first."""
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    http, grpc, metrics = free_ports(3)
    options = ServeOptions(max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
                           instances=config.instances, threads=config.threads, http_port=http, grpc_port=grpc,
                           metrics_port=metrics)
    with served(source, options, stop) as (server, model):
        if stop.is_set():
            return None
        target = resolve_model(server.url, model.name)
        feeds = random_feeds(target, batch=1)
        levels = sweep(server.url, target, feeds, concurrency=concurrency, duration=duration, warmup=warmup,
                       stop=stop, progress=(lambda line: progress(f"    {line}")) if progress else None)
    if stop.is_set():
        return None
    return tuple(levels), best(levels, slo), load


def record(out: Path, result: TuneResult) -> None:
    """The result as report.json's ``serving`` section of the output ``out``; report.md/.html rendered again."""
    out = resolve_output(Path(out))
    with output_lock(out):
        report = read_folder_json(out, "report.json")
        if not isinstance(report, dict):
            raise ConfigError(f"{out / 'report.json'} does not hold a JSON object; recompile it")
        report["serving"] = result.to_dict()
        write_json(out / "report.json", report)
        device = read_folder_json(out, "device_report.json", missing_ok=True)
        device = device if isinstance(device, dict) else None
        write_text(out / "report.md", Report.from_dict(report).to_markdown(device))
        write_text(out / "report.html", render_html(report, device))


def table(result: TuneResult) -> list[list]:
    """Rows of the tuning table (as report.md shows them): configuration, rounds held, median throughput at
    the objective, its range over the rounds, the median p99 of the best levels."""
    return rows(result.to_dict())


def to_json(result: TuneResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
