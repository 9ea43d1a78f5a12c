"""Load-test tables for the closing note: the demo CNN and a ResNet-18, dynamic batching off vs on.

    python bench/loadtest.py [--work DIR] [--duration 5] [--warmup 1] [--slo P=TIME] [--only cnn|resnet]

Each model is compiled by dlopt here (the demo: trained on scikit-learn's digits and compiled for
``cpu``, its held-out digits sent as real inputs; ResNet-18 with random weights and a dynamic batch,
compiled for this host's ONNX Runtime, random inputs), then ``dlopt loadtest OUT`` serves it with
Triton on free loopback ports twice: ``--max-batch-size 0`` (no batching) and the default dynamic
batcher (up to 8 per batch, 100 us queue delay; the demo's fixed batch-1 export cannot batch, as
the serve line says), closed loop at concurrency 1-16 and one open-loop rate sweep.  The tables
are the CLI's own.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DLOPT = str(Path(sys.executable).with_name("dlopt"))
RATES = {"cnn": "100,200,400,800", "resnet": "1,2,4,8"}
SLO = {"cnn": "p99=50ms", "resnet": "p99=1s"}  # ResNet-18 at 224x224 takes ~0.2 s a request on 2 cores


def _demo(work: Path) -> tuple[Path, list[str]]:
    out = work / "demo"
    if not (out / "cpu" / "manifest.json").is_file():
        from dlopt.workflows.demo import run_demo

        run_demo(out)
    return out / "cpu", ["--input", str(out / "digits_test.npz")]


def _resnet(work: Path) -> tuple[Path, list[str]]:
    out = work / "resnet18"
    if not (out / "manifest.json").is_file():
        import dlopt
        from models import export_resnet18, write_host_target

        model = export_resnet18(work / "resnet18.onnx", dynamic_batch=True)
        target, targets = write_host_target(work)
        dlopt.compile(model, target=target, targets_file=targets, out=out, precision="fp32", runs=10, warmup=2)
    return out, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dlopt-bench-loadtest"))
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--slo", default=None, help="[default: p99=50ms for the CNN, p99=1s for ResNet-18]")
    parser.add_argument("--only", choices=("cnn", "resnet"), default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for key, build in (("cnn", _demo), ("resnet", _resnet)):
        if args.only not in (None, key):
            continue
        out, inputs = build(args.work)
        for label, batching in (("batching off", ["--max-batch-size", "0"]), ("dynamic batching on", [])):
            command = [DLOPT, "loadtest", str(out), "--concurrency", "1,2,4,8,16", "--rate", RATES[key],
                       "--duration", str(args.duration), "--warmup", str(args.warmup), "--slo", args.slo or SLO[key],
                       "-q", *inputs, *batching]
            began = time.monotonic()
            done = subprocess.run(command, capture_output=True, text=True)
            print(f"\n## {key}: {label} ({time.monotonic() - began:.0f} s)\n$ {' '.join(command[1:])}")
            print(done.stdout.rstrip() or done.stderr.strip())


if __name__ == "__main__":
    main()
