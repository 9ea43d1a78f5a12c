"""Microcontroller acceptance run: a digits CNN compiled for a Cortex-M in FP32 and INT8.

Trains the demo's digits CNN (sklearn's load_digits, torch; dlopt.workflows.demo), exports it,
then ``dlopt.compile(..., target=cortex-m7, precision=fp32|int8)``: the compile flow runs
the generated C (built with the host gcc) on the whole held-out set against ONNX Runtime.
Then it prints, per precision: flash and RAM figures with arm-none-eabi-size's output, the
arena against the liveness lower bound, the top-1 of the C build and of ONNX Runtime on the
same model (the QDQ model for INT8), the qemu-system-arm run of real test images against the
host build, and the emulator's instruction count (a proxy, not device latency).

    .venv/bin/python bench/mcu.py [--target cortex-m7] [--out /tmp/dlopt-mcu] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def _train(out: Path, epochs: int, seed: int):
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import dlopt
    from dlopt.workflows.demo import _digits_cnn, _train as train

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, stratify=labels,
                                                        random_state=seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    model = _digits_cnn(torch)
    train(torch, model, x_train, y_train, epochs=epochs, seed=seed, progress=None)
    model.eval()
    path = dlopt.export(model, torch.from_numpy(x_test[:2]), out / "digits_cnn.onnx", {"image": {0: "batch"}},
                        input_names=["image"], output_names=["logits"])
    np.savez(out / "test.npz", image=x_test, labels=y_test)
    np.savez(out / "calib.npz", image=x_train[:256])
    return Path(path), x_test, y_test


def _ort_top1(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def run(target: str, out: Path, epochs: int, seed: int = 0) -> dict:
    import dlopt
    from dlopt.targets.c import verify as c_verify
    from dlopt.targets import read_artifact
    from dlopt.targets.c.backend import BACKEND

    out.mkdir(parents=True, exist_ok=True)
    model_path, x_test, y_test = _train(out, epochs, seed)
    results = {"target": target, "test_samples": int(len(y_test)),
               "ort_fp32_top1_original": _ort_top1(model_path, x_test, y_test)}
    for precision in ("fp32", "int8"):
        folder = out / precision
        report = dlopt.compile(model_path, target=target, out=folder, precision=precision,
                               inputs=out / "test.npz", calib=out / "calib.npz")
        chosen = report.chosen_candidate()
        if chosen is None:
            results[precision] = {"error": "no candidate shipped",
                                  "candidates": [(c.key, c.status.value, c.reason) for c in report.candidates]}
            continue
        artifact, _ = read_artifact(folder)
        settings = artifact.settings
        session = BACKEND.load(artifact)
        c_logits = session.run({"image": x_test})[0]
        row = {"c_host_top1": float((c_logits.argmax(1) == y_test).mean()),
               "compile_flow_accuracy": chosen.measurement.accuracy if chosen.measurement else None,
               "fidelity": chosen.fidelity.to_dict() if chosen.fidelity else None, "memory": {k: v for k, v in settings["memory"].items() if k != "offsets"},
               "weights_bytes": settings["weights_bytes"], "figures": settings.get("figures"),
               "ops": settings["ops"]}
        onnx_model = _candidate_onnx(folder, report, precision)
        if onnx_model is not None:  # the exact graph the C was generated from, on ONNX Runtime
            ort_logits = _run_ort_file(onnx_model, x_test)
            row["ort_same_model_top1"] = float((ort_logits.argmax(1) == y_test).mean())
            row["top1_agreement_c_vs_ort"] = float((ort_logits.argmax(1) == c_logits.argmax(1)).mean())
            row["max_abs_logit_diff_c_vs_ort"] = float(np.max(np.abs(ort_logits - c_logits)))
            if precision == "int8":  # the same sources built with ONNX Runtime's float requantisation
                from dlopt.targets.c.verify import HostSession

                ort_style = HostSession(folder, settings["inputs"], settings["outputs"], defines=("DLOPT_REQUANT_FLOAT",))
                f_logits = ort_style.run({"image": x_test})[0]
                ort_style.close()
                row["c_host_top1_with_ort_float_requant"] = float((f_logits.argmax(1) == y_test).mean())
                row["bit_identical_to_ort_with_float_requant"] = float(np.mean(np.all(f_logits == ort_logits, axis=1)))
            step = _output_step(onnx_model)
            if step:  # int8: the bound in quantisation steps of the output
                row["max_logit_diff_in_output_steps"] = round(row["max_abs_logit_diff_c_vs_ort"] / step, 2)
        if c_verify.qemu_tools() is True:
            picks = [[x_test[i]] for i in range(3)]
            with tempfile.TemporaryDirectory() as tmp:
                got, counts = c_verify.run_qemu(folder, settings["mcpu"], picks, settings["inputs"],
                                                settings["outputs"], Path(tmp))
            host = c_logits[:3]
            row["qemu"] = {"board": c_verify.QEMU_BOARDS[settings["mcpu"]][0], "test_images": 3,
                           "outputs_equal_host": bool(all(np.array_equal(g[0].reshape(-1), h.reshape(-1))
                                                          for g, h in zip(got, host))),
                           "max_abs_diff_vs_host": float(max(np.max(np.abs(g[0].reshape(-1) - h.reshape(-1)))
                                                             for g, h in zip(got, host))),
                           "emulator_instructions_per_inference (proxy, not latency)": counts}
        session.close()
        results[precision] = row
    return results


def _candidate_onnx(folder: Path, report, precision: str) -> Path | None:
    """The ONNX graph the C was generated from (the C backend ships it as reference.onnx)."""
    del report, precision
    path = folder / "reference.onnx"
    return path if path.exists() else None


def _output_step(path: Path) -> float | None:
    """The scale of the DequantizeLinear that produces the model's output, if one does."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next((n for n in model.graph.node if model.graph.output[0].name in n.output), None)
    if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
        return None
    return float(inits[node.input[1]].reshape(-1)[0])


def _run_ort_file(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="cortex-m7", choices=["cortex-m4", "cortex-m7"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="dlopt-mcu-"))
    results = run(args.target, out, args.epochs)
    for precision in ("fp32", "int8"):
        row = results.get(precision, {})
        figures = row.get("figures") or {}
        if figures:
            print(f"\n== {args.target} {precision}: arm-none-eabi-size\n{figures['arm_none_eabi_size']}")
    print(json.dumps(results, indent=2, default=str))
    print(f"\nartefacts in {out}")


if __name__ == "__main__":
    main()
