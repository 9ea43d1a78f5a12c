"""INT8 peers on real pretrained models, timed together in one interleaved run.

    python bench/real_models.py [--dir D]          # once: models and data
    python bench/peers_real.py [--model minilm|ocr] [--dir D] [--threads 2] [--runs 50] [--dlopt-out OUT]

Models (from bench/real_models.py): all-MiniLM-L6-v2 at batch 8 x sequence 64, scored by
the per-sentence cosine of its embedding with ORT FP32's on the eval set (minimum and
mean); or the PP-OCRv4 recogniser at batch 8 x 3x48x320, scored by exact-match of the
decoded lines.  Configurations, each as its users would write it:

* ONNX Runtime FP32;
* ONNX Runtime ``quantize_dynamic`` (per channel; opset raised to 13 first if lower);
* NNCF INT8 (``nncf.quantize`` on the opset >= 13, onnxsim-simplified model, calibrated on
  the calibration set; ``ModelType.TRANSFORMER`` for MiniLM) on OpenVINO, and the same
  QDQ model on ONNX Runtime;
* OpenVINO FP32 (f32 precision hint), and bf16 where the CPU lists BF16;
* with ``--dlopt-out``, the artefact dlopt chose in that output folder.

OpenVINO models are reshaped to the static benchmark shape, as an OpenVINO user timing a
fixed shape would.  Every configuration is opened at once and timed by
``dlopt.measure.timing.time_interleaved`` (round-robin blocks in a rotating order), so machine
drift falls on all alike.  Quantised peers are cached under D/peers.  Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

Run = Callable[[dict], list]


# ---------------------------------------------------------------- model preparation (cached)

def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def constants_to_initializers(model):
    """PP-OCR keeps its weights in Constant nodes, which quantisers do not treat as weights."""
    from onnx import numpy_helper

    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t),
                                                                   node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        tmp = path.with_name(path.stem + ".part.onnx")
        build(tmp)
        os.replace(tmp, path)
        print(f"  built {path.name} in {time.perf_counter() - start:.0f} s")
    return path


def simplified_op13(src: Path, out: Path) -> Path:
    """Constant weights as initializers, opset >= 13 (per-channel needs it), then onnxsim."""
    def build(tmp):
        import onnx
        import onnxsim
        from onnx import version_converter

        model = constants_to_initializers(onnx.load(str(src)))
        if _opset(model) < 13:
            model = version_converter.convert_version(model, 13)
        onnx.save(onnxsim.simplify(model)[0], str(tmp))
    return _cached(out, build)


def ort_dynamic(src: Path, out: Path) -> Path:
    def build(tmp):
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(str(src), str(tmp), per_channel=True)
    return _cached(out, build)


def nncf_int8(src: Path, out: Path, calib: list[dict], transformer: bool) -> Path:
    def build(tmp):
        import nncf
        import onnx

        nncf.set_log_level(logging.ERROR)
        extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset(calib), subset_size=len(calib), **extra)
        onnx.save(quantized, str(tmp))
    return _cached(out, build)


# ---------------------------------------------------------------- runners

def ort_runner(path: Path, threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def openvino_runner(path: Path, threads: int, shapes: dict, precision: str = "f32") -> Run:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape(shapes)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                 "INFERENCE_PRECISION_HINT": precision})
    request = compiled.create_infer_request()
    return lambda feed: [request.infer(feed)[compiled.output(0)]]


def openvino_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def dlopt_runner(out: Path) -> tuple[str, Run]:
    """dlopt's chosen artefact, loaded with the settings it was published with."""
    from dlopt.targets import load_artifact

    manifest = json.loads((out / "manifest.json").read_text())
    session = load_artifact(out)
    label = f"dlopt: {manifest.get('backend')} {manifest.get('precision')}"
    return label, session.run


# ---------------------------------------------------------------- scoring

def outputs_of(run: Run, data: dict, batch: int) -> np.ndarray:
    """First output over the whole set in batches of ``batch`` (the last one padded by repetition)."""
    n = len(next(iter(data.values())))
    out = []
    for i in range(0, n, batch):
        feed = {k: v[i:i + batch] for k, v in data.items()}
        short = batch - len(next(iter(feed.values())))
        if short:
            feed = {k: np.concatenate([v, np.repeat(v[-1:], short, 0)]) for k, v in feed.items()}
        out.append(np.asarray(run(feed)[0])[:batch - short])
    return np.concatenate(out)


def cosine_scores(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (a.astype(np.float64) * b).sum(1)
    return float(cos.min()), float(cos.mean())


# ---------------------------------------------------------------- the benchmark

def configurations(args, d: Path, work: Path, calib: dict) -> list[tuple[str, Callable[[], Run]]]:
    threads, minilm = args.threads, args.model == "minilm"
    src = d / ("minilm_l6.onnx" if minilm else "ocr_rec.onnx")
    shapes = ({"input_ids": [args.batch, 64], "attention_mask": [args.batch, 64]} if minilm
              else {"x": [args.batch, 3, 48, 320]})
    if minilm:
        items = [{k: v[i:i + 8] for k, v in calib.items()} for i in range(0, len(calib["input_ids"]), 8)]
    else:
        items = [{"x": x[None]} for x in calib["x"]]
    print("preparing peers (cached in", work, ")")
    sim = simplified_op13(src, work / f"{args.model}_op13_sim.onnx")
    dyn = ort_dynamic(sim, work / f"{args.model}_ort_dynamic.onnx")
    nncf_model = nncf_int8(sim, work / f"{args.model}_nncf.onnx", items, transformer=minilm)
    nncf_kind = "TRANSFORMER" if minilm else "default"
    configs = [
        ("ORT FP32", lambda: ort_runner(src, threads)),
        ("ORT quantize_dynamic per-channel", lambda: ort_runner(dyn, threads)),
        (f"NNCF INT8 ({nncf_kind}) on OpenVINO", lambda: openvino_runner(nncf_model, threads, shapes)),
        (f"NNCF INT8 ({nncf_kind}) QDQ on ORT", lambda: ort_runner(nncf_model, threads)),
        ("OpenVINO FP32 (f32 hint)", lambda: openvino_runner(src, threads, shapes)),
    ]
    if openvino_has_bf16():
        configs.append(("OpenVINO bf16 hint", lambda: openvino_runner(src, threads, shapes, "bf16")))
    else:
        print("OpenVINO bf16: skipped (BF16 not in the CPU's OPTIMIZATION_CAPABILITIES)")
    return configs


def main() -> None:
    from real_models import default_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "ocr"), default="minilm")
    parser.add_argument("--dir", type=Path, default=None, help="bench/real_models.py's folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=180.0, help="time budget of the interleaved timing")
    parser.add_argument("--dlopt-out", type=Path, default=None, help="a `dlopt compile` output folder to include")
    args = parser.parse_args()

    from dlopt.measure.timing import time_interleaved
    from ocr_metric import exact_match_of

    d = (args.dir or default_dir()).expanduser()
    minilm = args.model == "minilm"
    prefix = "minilm" if minilm else "ocr"
    if not (d / f"{prefix}_eval.npz").exists():
        raise SystemExit(f"peers_real: {d / f'{prefix}_eval.npz'} is missing; run bench/real_models.py --dir {d}")
    with np.load(d / f"{prefix}_eval.npz") as z:
        data = {k: z[k] for k in z.files if k != "labels"}
    with np.load(d / f"{prefix}_calib.npz") as z:
        calib = {k: z[k] for k in z.files}

    configs = configurations(args, d, d / "peers", calib)
    runners: dict[str, Run] = {}
    for name, make in configs:
        try:
            runners[name] = make()
        except Exception as exc:  # a peer that cannot load the model is a result too
            print(f"{name}: failed: {str(exc).splitlines()[0][:160]}")
    if args.dlopt_out is not None:
        try:
            name, run = dlopt_runner(args.dlopt_out)
            runners[name] = run
        except Exception as exc:
            print(f"dlopt ({args.dlopt_out}): failed: {str(exc).splitlines()[0][:160]}")

    scores: dict[str, tuple[float, float] | float | str] = {}
    reference = None
    for name, run in runners.items():
        try:
            got = outputs_of(run, data, args.batch)
        except Exception as exc:
            scores[name] = f"failed: {str(exc).splitlines()[0][:60]}"
            continue
        if minilm:
            reference = got if reference is None else reference
            scores[name] = cosine_scores(reference, got)
        else:
            scores[name] = exact_match_of([got], d)
    runnable = {n: r for n, r in runners.items() if not isinstance(scores.get(n), str)}

    feed = {k: v[:args.batch] for k, v in data.items()}
    shape = " ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
    print(f"timing {len(runnable)} configurations interleaved: {shape}, {args.threads} threads, "
          f"{args.runs} runs each (fewer if over {args.max_seconds:.0f} s)")
    timings = time_interleaved(runnable, feed, runs=args.runs, warmup=args.warmup, threads=args.threads,
                               max_seconds=args.max_seconds)
    base = timings.get("ORT FP32")
    metric = "cosine vs ORT FP32 min / mean" if minilm else "exact match"
    print(f"\n== {args.model} ==  shape {shape}, {args.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(f"{'configuration':<40} {'p50 ms':>9} {'95% CI of p50':>17} {'cv':>5} {'runs':>5} "
          f"{'vs ORT FP32':>11}  {metric}")
    for name in runners:
        s = scores.get(name)
        score = s if isinstance(s, str) else (f"{s[0]:.4f} / {s[1]:.4f}" if minilm else f"{s:.3f}")
        t = timings.get(name)
        if t is None:
            print(f"{name:<40} {'-':>9} {'':>17} {'':>5} {'':>5} {'':>11}  {score}")
            continue
        speed = f"{base.p50_ms / t.p50_ms:.2f}x" if base else "-"
        print(f"{name:<40} {t.p50_ms:9.2f} {f'{t.ci_low_ms:.2f}-{t.ci_high_ms:.2f}':>17} {t.cv:5.2f} {t.runs:5d} "
              f"{speed:>11}  {score}")


if __name__ == "__main__":
    main()
