"""dlopt's chosen artefact against the peers' plain defaults, timed by one harness in one run.

    python bench/peers.py [--runs 50] [--threads N] [--skip-tvm] [--resnet-max-drop 1]

Models: a ResNet-18-shaped network (random weights, 1x3x224x224) and a small CNN
trained for one epoch on Fashion-MNIST (batch 1).  Peers, each with its defaults:
ONNX Runtime FP32 session; ONNX Runtime INT8 QDQ from ``quantize_static`` defaults;
OpenVINO ``compile_model`` with an f32 hint and with no hint; NNCF's ONNX INT8 with its
defaults, run on OpenVINO; TVM untuned (Relax, default pipeline).  NVIDIA ModelOpt is not a
peer here: its ``[onnx]`` extra pins onnx 1.21 and onnxruntime-gpu 1.24 (replacing the
onnxruntime dlopt runs on) and places quantisers for TensorRT, which needs a GPU.  The real
pretrained models (PP-OCRv4, all-MiniLM-L6-v2) and their peers are in ``bench/peers_real.py``.  dlopt: ``dlopt compile --target cpu`` with the same calibration
and evaluation data and an accuracy budget, then its chosen artefact reloaded from
the output folder.  Every model is scored on the same evaluation inputs (top-1
against labels for the trained CNN; for the random-weight ResNet, whose near-tied
classes make top-1 agreement a coin toss, the mean cosine similarity of the logits with
the FP32 original) and timed with the same loop; sessions are created and dropped one
at a time so idle threads of one do not slow the next.  Prints a table
and the two ratios the acceptance asks for.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def p50_ms(run, feed, runs: int, warmup: int = 5, max_seconds: float = 20.0) -> tuple[float, int]:
    run(feed)
    start = time.perf_counter()
    run(feed)
    one = time.perf_counter() - start
    runs = max(5, min(runs, int(max_seconds / max(one, 1e-6))))
    for _ in range(warmup if one < 0.5 else 1):
        run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3), runs


def cosine_to(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean cosine similarity of each sample's logits with the reference's (1.0 = identical)."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = logits.reshape(len(logits), -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def score(run, eval_x, name, reference=None, labels=None, batch=1) -> float:
    """Top-1 accuracy against labels, else mean cosine similarity with the FP32 reference logits."""
    logits = np.concatenate([np.asarray(run({name: eval_x[i : i + batch]})[0]) for i in range(0, len(eval_x), batch)])
    if labels is not None:
        return float((logits.argmax(-1) == labels).mean())
    return cosine_to(reference, logits)


def ort_session(path, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def ort_int8_defaults(path, calib, name, work):
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {name: batch[None]}

    out = work / "ort_int8_defaults.onnx"
    quantize_static(str(path), str(out), Reader())  # QDQ, per-tensor, int8 activations: the defaults
    return out


def nncf_int8_defaults(path, calib, name, work):
    """NNCF's ONNX post-training quantisation with its defaults, as an OpenVINO user runs it:
    opset >= 13 (its per-channel Q/DQ need it) and onnxsim first (its pre-pass crashes on a
    Cast of an initializer); telemetry declined."""
    import os

    import onnx
    import onnxsim

    os.environ.setdefault("CI", "true")  # openvino-telemetry declines before writing ~/intel
    import nncf

    model = onnx.load(str(path))
    # NNCF reads the opset from opset_import[0] whatever its domain: torch's exporter lists others first
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    others = [o for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.extend(default + others)
    if model.opset_import[0].version < 13:
        model = onnx.version_converter.convert_version(model, 13)
    model = onnxsim.simplify(model)[0]
    quantized = nncf.quantize(model, nncf.Dataset([{name: x[None]} for x in calib]), subset_size=len(calib))
    out = work / "nncf_int8_defaults.onnx"
    onnx.save(quantized, str(out))
    return out


def openvino_session(path, threads, hint):
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {props.inference_num_threads: threads}
    if hint:
        config[hints.inference_precision] = ov.Type.f32
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda feed: [request.infer(feed)[compiled.output(0)]]


def tvm_session(path, threads, work):
    import onnx_ir as ir

    from dlopt.core.profiles import resolve_target
    from dlopt.targets.tvm import backend as tvm

    artifact = tvm.BACKEND.compile(ir.load(str(path)), resolve_target("cpu"), work / "tvm", precision="fp32",
                                   threads=threads)
    session = tvm.BACKEND.load(artifact)
    return session.run


def bench_model(label, path, name, eval_x, labels, calib, feed, args, work, max_drop) -> None:
    import dlopt
    from dlopt.calibration import open_dataset  # noqa: F401 - imported to fail early if missing
    from fashion import write_npz
    from dlopt.targets import load_artifact

    reference = None
    rows = []

    def measure(peer, make):
        gc.collect()
        try:
            run = make()
        except Exception as exc:  # a peer that cannot build the model is a result too
            print(f"  {peer}: failed: {str(exc).splitlines()[0][:150]}")
            return False
        ms, runs = p50_ms(run, feed, args.runs)
        nonlocal reference
        if reference is None:
            reference = np.concatenate([np.asarray(run({name: eval_x[i : i + 1]})[0]) for i in range(len(eval_x))])
        s = score(run, eval_x, name, reference, labels)
        rows.append((peer, ms, runs, s))
        del run
        gc.collect()
        return True

    threads = args.threads
    measure("ORT FP32 (default session)", lambda: ort_session(path, threads))
    int8 = ort_int8_defaults(path, calib, name, work)
    measure("ORT INT8 QDQ (quantize_static defaults)", lambda: ort_session(int8, threads))
    measure("OpenVINO (f32 hint)", lambda: openvino_session(path, threads, hint=True))
    try:
        nncf_int8 = nncf_int8_defaults(path, calib, name, work)
        measure("NNCF INT8 (defaults) on OpenVINO", lambda: openvino_session(nncf_int8, threads, hint=True))
    except Exception as exc:  # NNCF not installed or refusing the model: a result too
        print(f"  NNCF INT8 (defaults): failed: {str(exc).splitlines()[0][:150]}")
    measure("OpenVINO (default: no hint)", lambda: openvino_session(path, threads, hint=False))
    if not args.skip_tvm and not measure("TVM untuned", lambda: tvm_session(path, threads, work / f"{label}-tvm")):
        # The Relax frontend fails on some exported graphs; a TVM user would simplify first.
        import onnx
        import onnxsim

        simplified = work / f"{label}_simplified.onnx"
        onnx.save(onnxsim.simplify(onnx.load(str(path)))[0], str(simplified))
        measure("TVM untuned (after onnxsim)", lambda: tvm_session(simplified, threads, work / f"{label}-tvm-sim"))

    calib_npz = write_npz(work / f"{label}_calib.npz", name, calib)
    eval_npz = write_npz(work / f"{label}_eval.npz", name, eval_x, labels)
    start = time.perf_counter()
    # The same score for dlopt's budget: accuracy with labels, else cosine with the FP32 logits
    # (random weights make top-1 agreement a coin toss between near-tied classes).
    def cosine_metric(outputs, _labels):
        return cosine_to(reference, np.concatenate([np.asarray(o) for o in outputs]))

    report = dlopt.compile(path, target="cpu", out=work / f"{label}-dlopt", calib=calib_npz, inputs=eval_npz,
                           calib_samples=len(calib), max_accuracy_drop=max_drop, threads=threads,
                           runs=args.runs, search_time=args.search_time, cache=False,
                           metric=None if labels is not None else cosine_metric)
    seconds = time.perf_counter() - start
    chosen = report.chosen_candidate()
    measure(f"dlopt: {chosen.key} (ran {chosen.ran_as or chosen.precision})",
            lambda: load_artifact(work / f"{label}-dlopt").run)

    base_score = rows[0][3]
    ort_fp32 = rows[0][1]
    print(f"\n== {label} ==  ({threads} threads; budget: {max_drop} points of "
          f"{'top-1 accuracy' if labels is not None else 'mean cosine similarity of logits with ORT FP32'}; "
          f"dlopt compile took {seconds:.0f} s)")
    print(f"  {'configuration':<46} {'p50 ms':>9} {'runs':>5} {'score':>7} {'drop pp':>8}  within budget")
    best_peer = None
    for peer, ms, runs, s in rows:
        drop = (base_score - s) * 100
        ok = drop <= max_drop
        print(f"  {peer:<46} {ms:9.3f} {runs:5d} {s:7.4f} {drop:8.2f}  {'yes' if ok else 'NO'}")
        if ok and not peer.startswith("dlopt") and (best_peer is None or ms < best_peer[1]):
            best_peer = (peer, ms)
    mine = rows[-1][1]
    print(f"  dlopt / fastest peer within budget ({best_peer[0]}): {mine / best_peer[1]:.2f}x latency "
          f"(goal <= 1.0x)")
    print(f"  ORT FP32 default / dlopt: {ort_fp32 / mine:.1f}x faster")
    print("  dlopt's own table:")
    for c in report.candidates:
        lat = c.measurement.latency["p50_ms"] if c.measurement and c.measurement.latency else None
        drop = c.score.drop_pp if c.score else None
        print(f"    {c.key:<22} {('%.3f' % lat) if lat else '-':>9} ms  drop {('%.2f' % drop) if drop is not None else '-':>6}"
              f"  {'CHOSEN' if c.chosen else c.reason[:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-tvm", action="store_true", help="untuned TVM takes seconds per ResNet-18 run")
    parser.add_argument("--resnet-max-drop", type=float, default=1.0,
                        help="budget for the random-weight ResNet, in points of mean logit cosine similarity [1]")
    parser.add_argument("--cnn-max-drop", type=float, default=0.5, help="budget for the trained CNN [0.5]")
    parser.add_argument("--search-time", type=float, default=120.0)
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--skip-cnn", action="store_true")
    args = parser.parse_args()

    import torch

    from fashion import bench_module, load_fashion_mnist, train_fashion_cnn

    models = bench_module("models")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="dlopt-peers-") as tmp:
        work = Path(tmp)
        if not args.skip_resnet:
            path = models.export_resnet18(work / "resnet18.onnx", batch=1)
            calib = rng.standard_normal((64, 3, 224, 224), dtype=np.float32)
            eval_x = rng.standard_normal((100, 3, 224, 224), dtype=np.float32)
            bench_model("resnet18", path, "input", eval_x, None, calib, {"input": eval_x[:1]}, args, work,
                        args.resnet_max_drop)
        if not args.skip_cnn:
            x_train, y_train, x_test, y_test = load_fashion_mnist()
            cnn = train_fashion_cnn(x_train[:20000], y_train[:20000], epochs=1, seed=0, threads=args.threads)
            path = Path(dlopt_export(cnn, torch.from_numpy(x_test[:1]), work / "fashion_cnn.onnx"))
            bench_model("fashion-cnn", path, "input", x_test[:2000], y_test[:2000], x_train[20000:20500],
                        {"input": x_test[:1]}, args, work, args.cnn_max_drop)


def dlopt_export(module, example, path):
    import dlopt

    return dlopt.export(module.eval(), example, path, dynamic_axes={"input": {0: "batch"}}, input_names=["input"])


if __name__ == "__main__":
    main()
