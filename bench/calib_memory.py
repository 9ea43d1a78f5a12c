"""Memory of INT8 calibration on a large data set: 1,000 ResNet-18 images (~600 MB) from one .npz.

Prints figures; asserts nothing.  The calibration file is written chunk by chunk
straight into a stored (uncompressed) zip entry, so this script never holds the
data set either; dlopt should stream it too.  Goal: the RSS increase during
calibration stays within the model's size + 300 MB.  Temporary files are deleted.

    python bench/calib_memory.py [--samples 1000] [--method minmax] [--threads N]

``--synthetic`` instead measures calibration alone on a model whose activations are large
(8 Conv+Relu at 1x16x256x256, 68 MiB of float tensors per batch), each figure in its own
child process (ru_maxrss): dlopt.flow.ranges.compute_ranges (8 batches per ORT collect call)
against dlopt.calibration.collect_ranges (one batch per call), for 8 and 32 samples.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = (3, 224, 224)
HEADROOM_MB = 300


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def write_calibration_npz(path: Path, name: str, samples: int, *, chunk: int = 25, seed: int = 0) -> Path:
    """``samples`` random-normal float32 images under ``name``, generated and written ``chunk`` at a time."""
    rng = np.random.default_rng(seed)
    header = {"descr": npy.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
              "shape": (samples, *SHAPE)}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
            npy.write_array_header_1_0(entry, header)
            for start in range(0, samples, chunk):
                rows = min(chunk, samples - start)
                entry.write(rng.standard_normal((rows, *SHAPE), dtype=np.float32).tobytes())
    return path


_CHILD = """
import json, resource, sys, tempfile
from pathlib import Path
import numpy as np, onnx, onnxruntime
from dlopt.flow.ranges import compute_ranges
from dlopt.calibration.collect import collect_ranges
from onnx import TensorProto, helper, numpy_helper
C, S, L = 16, 256, 8
path, method, samples = sys.argv[1:]
rng = np.random.default_rng(0)
nodes, inits, prev = [], [], "x"
for i in range(L):
    inits.append(numpy_helper.from_array((rng.standard_normal((C, C, 3, 3)) * 0.1).astype(np.float32), f"w{i}"))
    nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], pads=[1] * 4),
              helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
    prev = f"r{i}"
model = helper.make_model(helper.make_graph(
    nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, S, S])],
    [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, C, S, S])], inits),
    opset_imports=[helper.make_opsetid("", 13)])
batches = ({"x": rng.standard_normal((1, C, S, S)).astype(np.float32)} for _ in range(int(samples)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as tmp:
    if path == "compute_ranges":
        compute_ranges(model, batches, Path(tmp) / "c.json", method=method)
    else:
        onnx.save(model, Path(tmp) / "m.onnx")
        collect_ranges(Path(tmp) / "m.onnx", batches, method=method, workdir=Path(tmp))
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))
"""


def synthetic() -> None:
    import json
    import subprocess

    activations = 17 * 16 * 256 * 256 * 4 / 2**20
    print(f"8 Conv+Relu at 1x16x256x256: {activations:.0f} MiB of float tensors per batch; "
          f"bound = model (0.1 MiB) + one batch + {HEADROOM_MB} MiB = {activations + HEADROOM_MB:.0f} MiB")
    for method in ("minmax", "percentile"):
        for path in ("compute_ranges", "collect_ranges"):
            figures = []
            for samples in (8, 32):
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", _CHILD, path, method, str(samples)],
                                      capture_output=True, text=True, check=True)
                figures.append(f"{samples} samples +{float(done.stdout.split()[-1]):.0f} MiB "
                               f"({time.perf_counter() - start:.1f} s)")
            print(f"  {method:10s} {path:15s} peak RSS increase: " + ", ".join(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--method", default="minmax", choices=("minmax", "entropy", "percentile"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--synthetic", action="store_true", help="calibration alone on a large-activation model")
    args = parser.parse_args()
    if args.synthetic:
        return synthetic()

    import logging

    import dlopt

    from models import export_resnet18, write_host_target

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantiser warns per tensor through the root logger
    total = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dlopt-calib-memory-") as tmp:
        work = Path(tmp)
        path = export_resnet18(work / "resnet18.onnx", batch=1)
        model_mb = path.stat().st_size / 2**20
        before = _rss_mb()
        start = time.perf_counter()
        calib = write_calibration_npz(work / "calib.npz", "input", args.samples)
        print(f"calibration file: {args.samples} x {'x'.join(map(str, SHAPE))} float32 random-normal, "
              f"{calib.stat().st_size / 2**20:.0f} MiB, written in {time.perf_counter() - start:.1f} s; "
              f"this script's RSS {before:.0f} -> {_rss_mb():.0f} MiB while writing it")

        start = time.perf_counter()
        # Random weights on random data: the accuracy budget means nothing here, so it is opened and the
        # mixed-precision search is off; this bench is about the calibration step only, which happens once
        # before any backend builds, so ONNX Runtime alone is enough.
        target, targets_file = write_host_target(work)
        report = dlopt.compile(path, target=target, targets_file=targets_file, out=work / "out",
                               precision="int8", calib=calib,
                               calib_samples=args.samples, calib_method=args.method, runs=args.runs,
                               threads=args.threads, max_accuracy_drop=100.0, search_time=0.0)
        seconds = time.perf_counter() - start
        cal = report.calibration
        limit = model_mb + HEADROOM_MB
        print(f"model: ResNet-18, {model_mb:.1f} MiB fp32 ONNX; threads {args.threads}")
        print(f"calibration ({cal['method']}): {cal['samples']} samples in {cal['batches']} batches, "
              f"{cal['seconds']:.1f} s ({cal['seconds'] / max(cal['samples'], 1) * 1e3:.1f} ms/sample)")
        print(f"  process peak RSS during calibration: {cal['peak_rss_mb']:.0f} MiB")
        print(f"  RSS increase during calibration:     {cal['rss_increase_mb']:.0f} MiB")
        print(f"  within model size + {HEADROOM_MB} MiB = {limit:.0f} MiB: "
              f"{'yes' if cal['rss_increase_mb'] <= limit else 'NO'}")
        for c in report.candidates:
            p50 = c.measurement.latency["p50_ms"] if c.measurement and c.measurement.latency else None
            print(f"  {c.key}: {c.status}{' (chosen)' if c.chosen else ''}"
                  + (f", p50 {p50:.2f} ms vs original {report.baseline.latency['p50_ms']:.2f} ms" if p50 else "")
                  + (f", {c.reason}" if c.reason else ""))
        print(f"dlopt.compile took {seconds:.0f} s")
    print(f"temporary files deleted ({work} exists: {work.exists()}); total {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()
