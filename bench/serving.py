"""Serving under load, for issue 26's acceptance: batching off vs the tuned configuration, the in-process bound.

    python bench/serving.py [--work DIR] [--models demo,resnet18] [--slo p99=250ms] [--duration 4]
                            [--tune-rounds 3] [--check-rounds 4] [--choice-only]

Per model (the digits CNN of ``dlopt demo``, and a ResNet-18 of bench/models.py with seeded random weights,
exported with a symbolic batch), on this machine, in one run:

1. compiled for ``--target cpu`` at fp32 (the demo: its own compile);
2. served by ``dlopt serve``'s server with batching off (1 instance), load-tested in closed loop at
   concurrency 1, 2, 4, 8, 16 and in open loop (Poisson arrivals) at 50%, 100% and 150% of the best
   closed-loop throughput;
3. tuned (``dlopt.workflows.serve_tune``: the default grid in ``--tune-rounds`` rotated rounds, closed
   loop at 1, 4, 16) for the objective, recorded into the output's report.json; then the check: the
   chosen configuration, batching off and the configuration with the highest median, each served afresh
   in ``--check-rounds`` rounds, interleaved in rotated order, with the tuner's own rule: does the
   choice reproduce?  (``--choice-only`` stops
   here.)  Then served afresh with the tuned configuration and load-tested exactly as in 2 (the
   rerun: does it still hold the objective?);
4. the in-process bound on the same artefact: OpenVINO's ``benchmark_app -hint throughput`` on the
   artefact's model file (batch 1, all cores), which has no HTTP, no serialisation and no Python backend.

Prints one table per model and configuration and the served throughput at the objective as a share of
the bound.  Every figure is measured here; the machine's load is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DLOPT = Path(sys.executable).with_name("dlopt")


def _compile(name: str, work: Path) -> Path:
    if name == "demo":
        out = work / "demo"
        if not (out / "cpu" / "report.json").is_file():
            subprocess.run([str(DLOPT), "demo", "-o", str(out)], check=True)
        return out / "cpu"
    sys.path.insert(0, str(HERE))
    import models  # bench/models.py

    onnx_path = work / "resnet18.onnx"
    if not onnx_path.is_file():
        models.export_resnet18(onnx_path, dynamic_batch=True)
    out = work / "resnet18-out"
    if not (out / "report.json").is_file():
        subprocess.run([str(DLOPT), "compile", str(onnx_path), "--target", "cpu", "--precision", "fp32", "-o", str(out),
                        "--runs", "20"], check=True)
    return out


def _levels(source: Path, options, rates_from: list | None, duration: float):
    from dlopt.deploy.serve import free_ports, served
    from dlopt.workflows.loadtest import random_feeds, resolve_model, sweep

    http, grpc, metrics = free_ports(3)
    options = replace(options, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with served(source, options, threading.Event()) as (server, model):
        target = resolve_model(server.url, model.name)
        feeds = random_feeds(target, batch=1)
        closed = sweep(server.url, target, feeds, concurrency=(1, 2, 4, 8, 16), duration=duration, warmup=1.0)
        peak = max(lv.throughput for lv in (rates_from or closed))
        rates = [round(peak * f, 1) for f in (0.5, 1.0, 1.5)]
        opened = sweep(server.url, target, feeds, rates=rates, duration=duration, warmup=1.0, seed=0)
    return closed, opened


def _bound(source: Path) -> tuple[float | None, str]:
    manifest = json.loads((source / "manifest.json").read_text())
    model = source / ("model.xml" if (source / "model.xml").is_file() else "model.onnx")
    tool = Path(sys.executable).with_name("benchmark_app")
    done = subprocess.run([str(tool), "-m", str(model), "-d", "CPU", "-hint", "throughput", "-t", "10", "-shape",
                           _shape_arg(model)], capture_output=True, text=True, timeout=300)
    found = re.search(r"Throughput:\s+([\d.]+)\s+FPS", done.stdout)
    return (float(found.group(1)) if found else None,
            f"benchmark_app -hint throughput on {model.name} ({manifest.get('backend')}/{manifest.get('precision')})")


def _shape_arg(model: Path) -> str:
    import onnx

    if model.suffix == ".xml":
        onnx_file = model.with_suffix(".onnx")
        model = onnx_file if onnx_file.is_file() else model
    if model.suffix == ".onnx":
        graph = onnx.load(str(model), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        shapes = []
        for i in graph.input:
            if i.name in inits:
                continue
            dims = [d.dim_value if d.dim_value > 0 else 1 for d in i.type.tensor_type.shape.dim]
            shapes.append(f"{i.name}[{','.join(map(str, dims))}]")
        return ",".join(shapes)
    return ""


def _check(source: Path, slo, result, rounds: int, duration: float):
    """The tuned choice against batching off (the simplest configuration) and the highest median, each served
    afresh ``rounds`` times in rotated order; the tuner's rule decides again.  (the check's TuneResult, whether
    it chose the same configuration)."""
    from dlopt.workflows.serve_tune import simplicity, tune

    simplest = min(result.trials, key=lambda t: simplicity(t.config))
    top = max(result.trials, key=lambda t: t.throughput)
    configs = sorted({t.config for t in (simplest, result.chosen, top)}, key=simplicity)
    check = tune(source, slo, configs=configs, duration=duration * rounds, rounds=rounds,
                 progress=lambda line: print(f"  check {line}", flush=True))
    return check, check.chosen is not None and check.chosen.config == result.chosen.config


def _rounds_table(title: str, result) -> None:
    print(f"\n{title} ({result.seconds:.0f} s; {len(result.orders)} rounds, {result.level_seconds:g} s counted a "
          f"level)")
    for t in result.trials:
        mark = " (chosen)" if t is result.chosen else ""
        each = ", ".join(f"{r.throughput:.0f} (load {r.load_average})" for r in sorted(t.runs, key=lambda r: r.round))
        print(f"  {t.config.label + mark:<56} median {t.throughput:>7.0f}/s  {t.low:.0f}-{t.high:.0f}  "
              f"held {t.held}/{len(t.runs)}  rounds: {each}")
    print(f"  {result.why}")


def _table(title: str, levels) -> None:
    print(f"\n{title}")
    print(f"  {'load':<18}{'requests':>9}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>7}{'late':>6}")
    for lv in levels:
        p = [f"{getattr(lv, f'{k}_ms') or 0:9.2f}" for k in ("p50", "p95", "p99")]
        late = "" if lv.late is None else lv.late
        print(f"  {lv.label:<18}{lv.requests:>9}{lv.throughput:>9.1f}{''.join(p)}{lv.errors:>7}{late!s:>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dlopt-bench-serving"))
    ap.add_argument("--models", default="demo,resnet18")
    ap.add_argument("--slo", default="p99=250ms")
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--tune-rounds", type=int, default=3)
    ap.add_argument("--check-rounds", type=int, default=4)
    ap.add_argument("--choice-only", action="store_true", help="tune and check the choice; no tables, no bound")
    args = ap.parse_args()
    from dlopt.deploy.serve import ServeOptions
    from dlopt.workflows.loadtest import best, holds, parse_slo
    from dlopt.workflows.serve_tune import record, tune

    slo = parse_slo(args.slo)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start; objective "
          f"{slo.describe()}; {args.duration:g} s per level after 1 s warm-up; single-sample requests, one HTTP "
          f"client per worker")
    for name in args.models.split(","):
        source = _compile(name, args.work)
        print(f"\n=== {name}: {source} ===")
        if not args.choice_only:
            off_closed, off_open = _levels(source, ServeOptions(max_batch_size=0, use_tuned=False), None,
                                           args.duration)
            _table(f"{name}, batching off, 1 instance: closed loop", off_closed)
            _table(f"{name}, batching off, 1 instance: open loop (Poisson)", off_open)
        print(f"\n{name}: tuning, load average {os.getloadavg()[0]:.1f}", flush=True)
        result = tune(source, slo, rounds=args.tune_rounds, progress=lambda line: print(f"  tune {line}", flush=True))
        record(source, result)
        _rounds_table(f"{name}: tuning, objective {slo.describe()}", result)
        if result.chosen is None:
            print("  no configuration holds the objective")
            continue
        check, same = _check(source, slo, result, args.check_rounds, args.duration)
        _rounds_table(f"{name}: the choice checked in fresh servers, interleaved", check)
        print(f"  the choice {'reproduces' if same else 'does NOT reproduce'}: tuned {result.chosen.config.label}, "
              f"check {check.chosen.config.label if check.chosen else 'none holds'}; load average now "
              f"{os.getloadavg()[0]:.1f}")
        if args.choice_only:
            continue
        # the rerun: a fresh server that takes the tuned configuration from report.json
        on_closed, on_open = _levels(source, ServeOptions(), off_closed, args.duration)
        _table(f"{name}, tuned ({result.chosen.config.label}), fresh server: closed loop", on_closed)
        _table(f"{name}, tuned, fresh server: open loop (Poisson, same rates as batching off)", on_open)
        for label, levels in (("batching off", off_closed), ("batching off", off_open), ("tuned", on_closed),
                              ("tuned", on_open)):
            top = best(levels, slo)
            loop = "open" if levels and levels[0].rate is not None else "closed"
            print(f"  {label}, {loop} loop: best within the objective: "
                  + (f"{top.label}, {top.throughput:.1f} req/s, p99 {top.p99_ms:.2f} ms" if top else "none"))
        held = [lv for lv in on_closed if holds(lv, slo)]
        print(f"  rerun holds the objective at {len(held)} of {len(on_closed)} closed-loop levels")
        print(f"  load average now {os.getloadavg()[0]:.1f}")
        bound, how = _bound(source)
        top = best(on_closed, slo)
        if bound and top:
            print(f"  in-process bound: {bound:.1f} inferences/s ({how}); served at the objective: "
                  f"{top.throughput:.1f} req/s = {100 * top.throughput / bound:.0f}% of it")
        else:
            print(f"  in-process bound: not measured ({how})")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
