"""What ``session.x64quantprecision`` (set in every ORT session dlopt opens or ships) costs and saves.

On x86 CPUs without VNNI, ONNX Runtime's default int8 kernels add pairs of uint8 x int8
products in 16 bits and saturate; the session entry switches them to exact U8U8 kernels
(ORT ignores it on CPUs with VNNI and on ARM).  This script quantises ResNet-18
(random weights, realistic BN statistics, 1x3x224x224) with dlopt's static QDQ pass and
runs it three ways, timed interleaved: int8 with ORT's default kernels, int8 with the
entry (what dlopt ships), and the fp32 model.  It prints the latency ratios and how far
each int8 run is from the exact QDQ arithmetic and from fp32 (top-1 agreement, cosine).

Prints figures; asserts nothing.

    python bench/ort_int8_precision.py [--runs 100] [--threads 2] [--images 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()

    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from dlopt.passes.quantize_static import QuantizeStaticPass
    from dlopt.core.profiles import resolve_target
    from dlopt.flow.ranges import compute_ranges
    from dlopt.measure.timing import time_interleaved
    from models import export_resnet18

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="dlopt-bench-") as tmp:
        tmp = Path(tmp)
        path = export_resnet18(tmp / "resnet18.onnx")
        fp32 = onnx.load(str(path))
        name = fp32.graph.input[0].name
        calib = [{name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)]
        compute_ranges(fp32, calib, tmp / "ranges.json")
        qdq = ir.serde.serialize_model(QuantizeStaticPass(ranges=tmp / "ranges.json")(ir.serde.deserialize_model(fp32)).model)

        def session(model, exact: bool):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            if exact:
                options.add_session_config_entry("session.x64quantprecision", "1")
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

        sessions = {"int8 default kernels": session(qdq, False), "int8 exact (dlopt)": session(qdq, True),
                    "fp32": session(fp32, False)}
        images = [{name: rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(args.images)]
        outs = {k: np.concatenate([s.run(None, f)[0] for f in images]) for k, s in sessions.items()}

        def cosine(a, b):
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
            return float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))

        exact = outs["int8 exact (dlopt)"]
        saturates = resolve_target("cpu").int8_pairs_saturate()
        print(f"ResNet-18 1x3x224x224, {args.threads} threads, ORT {ort.__version__}, "
              f"this CPU {'has no VNNI' if saturates else 'has VNNI (both int8 runs should agree)'}; "
              f"{args.images} random-normal images")
        for key in ("int8 default kernels", "int8 exact (dlopt)"):
            out = outs[key]
            print(f"  {key:22s} max |diff| vs exact int8 {np.abs(out - exact).max():.4f}; vs fp32: top-1 agreement "
                  f"{np.mean(out.argmax(1) == outs['fp32'].argmax(1)):.2%}, min cosine {cosine(out, outs['fp32']):.4f}")
        timings = time_interleaved({k: (lambda f, s=s: s.run(None, f)) for k, s in sessions.items()}, images[0],
                                   runs=args.runs, warmup=10, threads=args.threads)
        base = timings["fp32"].p50_ms
        print(f"latency, {timings['fp32'].runs} interleaved runs each, p50 (95% CI):")
        for key, t in timings.items():
            print(f"  {key:22s} {t.p50_ms:7.2f} ms ({t.ci_low_ms:.2f}-{t.ci_high_ms:.2f})  {base / t.p50_ms:.2f}x fp32")
        ratio = timings["int8 exact (dlopt)"].p50_ms / timings["int8 default kernels"].p50_ms
        print(f"exact int8 takes {ratio:.2f}x the time of the default (saturating) int8 kernels")


if __name__ == "__main__":
    main()
