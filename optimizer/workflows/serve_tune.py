"""Batching sized for a latency objective: the served configuration with the most throughput that holds it.

As Triton's Model Analyzer does, on the real server: every configuration of a small grid (dynamic
batching off, or a largest batch × a queue delay; 1 or 2 instances, the cores split between them)
is served afresh by ``dlopt serve``'s server and load-tested in closed loop at rising concurrency
(``dlopt.workflows.loadtest``, single-sample requests: the server forms the batches).  A
configuration's figure is the throughput of its best level that holds the objective (no errors,
every percentile limit met); the chosen one has the highest.  An artefact whose inputs and
outputs have no symbolic batch axis cannot take the batches the server forms: only unbatched
configurations are tried, and the result says why.

``record`` writes the result into the output's report.json (its ``serving`` section: the grid,
every level measured, the choice, the objective and the machine it was measured on) and renders
report.md and report.html again; ``dlopt package --triton`` then writes that dynamic batching and
instance group into config.pbtxt.
"""

from __future__ import annotations

import json
import os
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
from dlopt.targets import read_artifact
from dlopt.workflows.loadtest import Level, Slo, best, random_feeds, resolve_model, sweep

BATCH_SIZES = (4, 16)
QUEUE_DELAYS_US = (500, 2000)
INSTANCES = (1, 2)
CONCURRENCY = (1, 4, 16)


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
class Trial:
    config: ServingConfig
    levels: tuple[Level, ...]
    best: Level | None  # the level with the most throughput that holds the objective

    @property
    def throughput(self) -> float:
        return self.best.throughput if self.best is not None else 0.0

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "levels": [lv.to_dict() for lv in self.levels],
                "throughput_at_objective": round(self.throughput, 2) if self.best else None,
                "best_concurrency": self.best.concurrency if self.best else None}


@dataclass(frozen=True)
class TuneResult:
    slo: Slo
    trials: tuple[Trial, ...]
    chosen: Trial | None
    batching_off_because: str | None = None
    host: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"objective": self.slo.describe(), "measured_on": self.host, "seconds": round(self.seconds, 1),
                "load": "closed loop, single-sample requests", "batching_off_because": self.batching_off_because,
                "trials": [t.to_dict() for t in self.trials],
                "chosen": self.chosen.config.to_dict() if self.chosen else None,
                "chosen_throughput": round(self.chosen.throughput, 2) if self.chosen else None}


def grid(batchable: bool, cores: int) -> list[ServingConfig]:
    """Batching off first, then largest batch x queue delay; 1 and (with 2+ cores) 2 instances."""
    counts = [n for n in INSTANCES if n <= max(cores, 1)]
    configs = [ServingConfig(0, 0, n, max(cores // n, 1)) for n in counts]
    if batchable:
        configs += [ServingConfig(b, d, n, max(cores // n, 1)) for b in BATCH_SIZES for d in QUEUE_DELAYS_US
                    for n in counts]
    return configs


def batching_blocker(source: Path) -> str | None:
    """Why the server cannot batch this artefact's requests (a fixed first dimension), or None."""
    artifact, root = read_artifact(source)
    inputs, outputs = _specs(artifact, root)
    fixed = [s.name for s in (*inputs, *outputs) if not s.shape or isinstance(s.shape[0], int)]
    if not inputs or fixed:
        return (f"{', '.join(fixed[:4]) or 'the inputs'} have a fixed first dimension: the artefact cannot take "
                f"the batches the server forms (export it with a symbolic batch axis to batch)")
    return None


def tune(source: Path, slo: Slo, *, configs: Sequence[ServingConfig] | None = None,
         concurrency: Sequence[int] = CONCURRENCY, duration: float = 3.0, warmup: float = 1.0,
         stop: threading.Event | None = None, progress: Callable[[str], None] | None = None) -> TuneResult:
    """Serve and load-test each configuration; the one with the most throughput that holds ``slo``."""
    stop = stop or threading.Event()
    began = time.perf_counter()
    blocker = batching_blocker(Path(source))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    configs = list(configs) if configs is not None else grid(blocker is None, cores)
    if blocker and any(c.max_batch_size for c in configs):
        raise ConfigError(f"dynamic batching: {blocker}")
    trials = []
    for k, config in enumerate(configs, 1):
        if stop.is_set():
            break
        if progress:
            progress(f"[{k}/{len(configs)}] {config.label}")
        http, grpc, metrics = free_ports(3)
        options = ServeOptions(max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
                               instances=config.instances, threads=config.threads, http_port=http, grpc_port=grpc,
                               metrics_port=metrics)
        with served(Path(source), options, stop) as (server, model):
            if stop.is_set():
                break
            target = resolve_model(server.url, model.name)
            feeds = random_feeds(target, batch=1)
            levels = sweep(server.url, target, feeds, concurrency=concurrency, duration=duration, warmup=warmup,
                           stop=stop, progress=(lambda line: progress(f"    {line}")) if progress else None)
        trials.append(Trial(config, tuple(levels), best(levels, slo)))
    held = [t for t in trials if t.best is not None]
    chosen = max(held, key=lambda t: t.throughput) if held else None
    return TuneResult(slo, tuple(trials), chosen, blocker, host_info(), time.perf_counter() - began)


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
    """Rows of the tuning table: configuration, best level, throughput at the objective, its p99."""
    rows = []
    for t in result.trials:
        mark = " (chosen)" if result.chosen is t else ""
        rows.append([t.config.label + mark, t.best.label if t.best else "none holds",
                     f"{t.throughput:.1f}" if t.best else "-", f"{t.best.p99_ms:.2f}" if t.best else "-"])
    return rows


def to_json(result: TuneResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
