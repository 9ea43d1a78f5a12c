"""Tuned vs untuned TVM against ONNX Runtime FP32, on ResNet-18 and a small CNN, on this machine.

    python bench/tune.py [--minutes 25] [--cnn-minutes 3] [--trials 3000] [--runs 30] [--threads 2] [--db DIR]

For each model: the library dlopt builds untuned, ``dlopt tune`` (MetaSchedule, this
host's CPU target with its vector features and cores) for the time budget, the library
dlopt builds with that database, and ONNX Runtime FP32 on the original model, all three
timed interleaved in one process (dlopt.measure.timing, 95% intervals of the median).  Prints
the trials, the tuning wall time, where it went and the ratios.  The models are built
here with random weights (bench/models.py): nothing is downloaded.  A rerun with the same
``--db`` continues the tuning from its records.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _small_cnn(path: Path) -> Path:
    import torch

    from models import FashionCNN

    torch.manual_seed(0)
    model = FashionCNN().eval()
    import dlopt

    dlopt.export(model, torch.zeros(1, 1, 28, 28), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=25.0, help="tuning budget for ResNet-18")
    parser.add_argument("--cnn-minutes", type=float, default=3.0, help="tuning budget for the small CNN")
    parser.add_argument("--trials", type=int, default=3000, help="trial cap per model (the budget usually ends first)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--db", type=Path, default=None, help="tuning database root [a temporary folder]")
    parser.add_argument("--models", default="cnn,resnet18")
    args = parser.parse_args()

    from dlopt.core.config import CompileConfig
    from dlopt.targets.tvm import backend
    from dlopt.targets.ort import OrtSession, session_settings
    from dlopt.measure.timing import LocalRunner, time_interleaved
    from dlopt.workflows.tune import backend_model, run

    from models import export_resnet18

    rows = []
    with tempfile.TemporaryDirectory(prefix="dlopt-bench-tune-") as tmp:
        work = Path(tmp)
        db = args.db or work / "db"
        for name in args.models.split(","):
            path = export_resnet18(work / "resnet18.onnx") if name == "resnet18" else _small_cnn(work / "cnn.onnx")
            minutes = args.minutes if name == "resnet18" else args.cnn_minutes
            config = CompileConfig.build(path, target="cpu", threads=args.threads, tuning_db=str(db))
            profile, model, shapes, _ = backend_model(config)
            started = time.perf_counter()
            plain = backend.BACKEND.compile(model, profile, work / f"{name}-untuned", precision="fp32",
                                            threads=args.threads, shapes=shapes)
            untuned_build_s = time.perf_counter() - started

            def progress(stage, done, total, _last=[0.0]):  # noqa: B006 - a log line every 30 s
                if time.monotonic() - _last[0] > 30 or (total and done >= total):
                    _last[0] = time.monotonic()
                    print(f"  {name}: {stage} {done}/{total}", flush=True)

            result = run(config, trials=args.trials, time_budget_s=minutes * 60, progress=progress)
            print(f"{name}: {result.summary()}", flush=True)
            started = time.perf_counter()
            tuned = backend.BACKEND.compile(model, profile, work / f"{name}-tuned", precision="fp32",
                                            threads=args.threads, shapes=shapes,
                                            tuning=backend.tuning_database(model, profile, args.threads, shapes, db))
            tuned_build_s = time.perf_counter() - started
            feed = {k: np.random.default_rng(0).standard_normal(v).astype(np.float32) for k, v in shapes.items()}
            runners = {"untuned": LocalRunner("untuned", lambda a=plain: backend.BACKEND.load(a)),
                       "tuned": LocalRunner("tuned", lambda a=tuned: backend.BACKEND.load(a)),
                       "ort": LocalRunner("ort", lambda: OrtSession(str(path), session_settings(args.threads)))}
            for r in runners.values():
                r.open()
            try:
                outs = {k: r.run(feed)[0] for k, r in runners.items()}
                err = float(np.max(np.abs(outs["tuned"] - outs["ort"])) / np.max(np.abs(outs["ort"])))
                timings = time_interleaved({k: r.run for k, r in runners.items()}, feed, runs=args.runs, warmup=3,
                                           threads=args.threads, max_seconds=120)
            finally:
                for r in runners.values():
                    r.close()
            top = sorted(result.best_ms.items(), key=lambda kv: -kv[1])[:3]
            rows.append((name, shapes, result, timings, err, untuned_build_s, tuned_build_s, tuned.settings["tuning"],
                         top))

    print()
    print(f"threads {args.threads}, interleaved runs per row as shown, CPU target: "
          f"{rows[0][3]['tuned'].threads if rows else '-'} threads")
    for name, shapes, result, t, err, ub, tb, how, top in rows:
        u, tu, o = t["untuned"], t["tuned"], t["ort"]
        print(f"\n{name} {shapes}")
        print(f"  tuning        {result.trials_run} trials now, {result.trials_in_db} in the database, "
              f"{result.seconds:.0f} s wall ({result.stopped or 'trial cap reached'}); {how}")
        print(f"  builds        untuned {ub:.1f} s, tuned {tb:.1f} s")
        print("  slowest tuned kernels (best ms): " + ", ".join(f"{k} {v:.2f}" for k, v in top))
        for label, timing in (("TVM untuned", u), ("TVM tuned", tu), ("ORT FP32", o)):
            print(f"  {label:<13} p50 {timing.p50_ms:9.3f} ms  (95% CI {timing.ci_low_ms:.3f}-{timing.ci_high_ms:.3f}, "
                  f"{timing.runs} runs, cv {timing.cv:.3f})")
        print(f"  tuned vs untuned: {u.p50_ms / tu.p50_ms:.1f}x faster; tuned vs ORT: {tu.p50_ms / o.p50_ms:.2f}x "
              f"ORT's latency; tuned max rel error vs ORT {err:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
