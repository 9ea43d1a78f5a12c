"""Peak memory and time of `dlopt compile` on tiny models that describe huge work.

Two models of a few kilobytes at most, built in a temporary folder:

- ``nested_if``: 30 nested ``If`` (each then-branch holds the next level), with
  conditions computed from the float input so random inputs can drive it;
- ``constant_of_shape``: ``y = x @ ConstantOfShape([12000, 12000])``, a 576 MB
  float32 constant described by ~200 bytes.

Each is compiled by the installed ``dlopt`` in a child process, with every CPU backend
(``--target cpu``) and with ONNX Runtime alone (``ort-cpu``, which isolates dlopt's
own passes from what other backends do with the model).  A last row per model runs
it once in a bare ONNX Runtime session: the floor any compile that runs the model
pays.  Peak RSS counts the compile and its children (onnxsim runs in one).  Goal:
each compile under 60 s and 1 GB.  Prints a table; asserts nothing.

    python bench/resource_guards.py [--timeout 120] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
GOAL_SECONDS, GOAL_MB = 60, 1024
ORT_ONLY = '[targets.ort-cpu]\nbase = "cpu"\ndescription = "this CPU, ONNX Runtime only"\nbackends = ["ort"]\n'
# Runs the model once in ONNX Runtime with inputs of ones.
ORT_FLOOR = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, {i.name: np.ones([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
                   for i in session.get_inputs()})
"""


def nested_if(depth: int = 30) -> onnx.ModelProto:
    def info(name: str) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4])

    def level(k: int) -> list[onnx.NodeProto]:
        if k == depth:
            return [helper.make_node("Relu", ["x"], [f"y{k}"])]
        then = helper.make_graph([*level(k + 1), helper.make_node("Add", [f"y{k + 1}", "x"], [f"t{k}"])],
                                 f"then{k}", [], [info(f"t{k}")])
        other = helper.make_graph([helper.make_node("Neg", ["x"], [f"e{k}"])], f"else{k}", [], [info(f"e{k}")])
        return [helper.make_node("ReduceSum", ["x"], [f"s{k}"], keepdims=0),
                helper.make_node("Greater", [f"s{k}", "zero"], [f"c{k}"]),
                helper.make_node("If", [f"c{k}"], [f"y{k}"], then_branch=then, else_branch=other)]

    graph = helper.make_graph(level(0), "nested_if", [info("x")], [info("y0")],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    return _model(graph)


def constant_of_shape(n: int = 12000) -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([n, n], np.int64), "shape")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"],
                              value=numpy_helper.from_array(np.array([0.5], np.float32))),
             helper.make_node("MatMul", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "constant_of_shape",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [shape])
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def measure(command: list[str], cwd: Path, timeout: float) -> tuple[int | None, float, float]:
    """Exit code (None on timeout), wall seconds and peak RSS in MB of ``command`` and its children."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)  # its own process group: a timeout kills onnxsim too
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            os.killpg(child.pid, signal.SIGKILL)
            _, status, usage = os.wait4(child.pid, 0)
            child.returncode = -signal.SIGKILL
            return None, time.perf_counter() - start, usage.ru_maxrss / 1024
        time.sleep(0.05)
    child.returncode = os.waitstatus_to_exitcode(status)
    # wait4 reports the larger of the child's own peak and its waited-for children's.
    return child.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def _simplify_note(out: Path) -> str:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return "-"
    record = next((p for p in report["passes"] if p["name"] == "SimplifyPass"), None)
    if record is None:
        return "-"
    return f"{record['seconds']:.1f} s" + (f", {record['note']}" if record["note"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=120.0, help="kill a compile after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    from tabulate import tabulate

    dlopt = str(Path(sys.executable).parent / "dlopt")
    folder = Path(tempfile.mkdtemp(prefix="dlopt-resource-guards-"))
    (folder / "dlopt.toml").write_text(ORT_ONLY)
    rows = []
    try:
        for name, build in (("nested_if", nested_if), ("constant_of_shape", constant_of_shape)):
            path = folder / f"{name}.onnx"
            onnx.save(build(), path)
            size = path.stat().st_size
            for target in ("cpu", "ort-cpu"):
                out = folder / f"{name}-{target}"
                code, seconds, peak = measure([dlopt, "compile", path.name, "--target", target, "-o", out.name, "-q"],
                                              folder, args.timeout)
                within = code == 0 and seconds < GOAL_SECONDS and peak < GOAL_MB
                rows.append([name, size, f"dlopt compile --target {target}",
                             "timeout" if code is None else code, f"{seconds:.1f}", f"{peak:.0f}",
                             _simplify_note(out), "yes" if within else "NO"])
                print(f"{name} {target}: exit {code}, {seconds:.1f} s, {peak:.0f} MB", file=sys.stderr, flush=True)
            code, seconds, peak = measure([sys.executable, "-c", ORT_FLOOR, path.name], folder, args.timeout)
            rows.append([name, size, "onnxruntime session + 1 run (floor)", "timeout" if code is None else code,
                         f"{seconds:.1f}", f"{peak:.0f}", "-", "-"])
    finally:
        if args.keep:
            print(f"kept {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(tabulate(rows, headers=["model", "bytes", "run", "exit", "wall s", "peak RSS MB", "SimplifyPass",
                                  f"< {GOAL_SECONDS} s and < {GOAL_MB} MB"]))


if __name__ == "__main__":
    main()
