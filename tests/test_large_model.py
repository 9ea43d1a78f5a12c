"""A model over 2 GB (protobuf's limit) with external data is loaded, optimised and saved whole."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import dlopt

ROWS, COLS = 545_000, 1000  # 2.18 GB of float32 weights


def _write_big_model(folder):
    """Gather from a 2.18 GB embedding table kept in external data, written in chunks."""
    data = folder / "big.onnx.data"
    rows = np.arange(ROWS, dtype=np.float32)[:, None]
    with open(data, "wb") as fh:
        for start in range(0, ROWS, 50_000):
            block = rows[start : start + 50_000] + np.arange(COLS, dtype=np.float32)[None, :] * 1e-3
            fh.write(block.astype("<f4").tobytes())
    table = onnx.TensorProto(name="table", data_type=TensorProto.FLOAT, dims=[ROWS, COLS])
    table.data_location = TensorProto.EXTERNAL
    table.external_data.add(key="location", value=data.name)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0),
         helper.make_node("Identity", ["rows"], ["y"])],  # something for the passes to remove
        "big", [helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, COLS])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, folder / "big.onnx")
    return folder / "big.onnx"


def test_compile_model_over_2gb(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = _write_big_model(src)
    assert (src / "big.onnx.data").stat().st_size > 2**31
    out = tmp_path / "out"
    # ONNX Runtime alone: loading, optimising and saving the 2 GB model is dlopt's, whichever backend builds it
    (tmp_path / "targets.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    try:
        report = dlopt.compile(path, target="here", targets_file=tmp_path / "targets.toml", out=out,
                               precision="fp32", runs=2, warmup=1, samples=2)
        assert report.chosen == "ort/fp32"
        assert sorted(p.name for p in out.iterdir()) == [
            "README.md", "manifest.json", "model.onnx", "model.onnx.data", "report.html", "report.json", "report.md",
            "run_candidates.py", "session_options.json", "verify.npz"]
        assert (out / "verify.npz").stat().st_size < 1 << 20  # feeds and outputs, never the 2 GB of weights
        assert (out / "model.onnx.data").stat().st_size == ROWS * COLS * 4
        optimised = onnx.load(out / "model.onnx", load_external_data=False)
        assert [n.op_type for n in optimised.graph.node] == ["Gather"]  # Identity removed
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        idx = np.array([0, 7, 123_456, ROWS - 1], dtype=np.int64)
        (rows,) = session.run(None, {"idx": idx})
        expected = idx[:, None].astype(np.float32) + np.arange(COLS, dtype=np.float32)[None, :] * 1e-3
        np.testing.assert_array_equal(rows, expected)
        assert json.loads((out / "manifest.json").read_text())["files"][:2] == ["model.onnx", "model.onnx.data"]
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # 4+ GB: do not leave it for pytest's retention
