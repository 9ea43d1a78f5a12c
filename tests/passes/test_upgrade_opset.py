"""Old opsets: converted to 13 (outputs checked) so INT8 weights can be per channel; else per tensor."""

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from cli import dlopt
from dlopt.passes.quantize_static import QuantizeStaticPass
from dlopt.passes.upgrade_opset import UpgradeOpsetPass
from helpers import assert_same_outputs


def conv_gemm(opset=11, seed=0):
    """Conv(8) -> Relu -> Flatten -> Gemm(10), the shape of an old torchvision/PaddleOCR export."""
    rng = np.random.default_rng(seed)
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 3, 3, 3], rng.standard_normal(216) * 0.3)
    b = helper.make_tensor("b", TensorProto.FLOAT, [8], rng.standard_normal(8) * 0.1)
    g = helper.make_tensor("g", TensorProto.FLOAT, [10, 8 * 6 * 6], rng.standard_normal(2880) * 0.05)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[0, 0, 0, 0]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [w, b, g])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)


def test_upgrade_keeps_outputs_and_leaves_new_models_alone():
    old = conv_gemm(11)
    upgrade = UpgradeOpsetPass()
    result = upgrade(ir.serde.deserialize_model(old))
    assert result.modified and upgrade.converted and "opset 11 -> 13" in upgrade.note
    assert result.model.opset_imports[""] == 13
    assert_same_outputs(old, ir.serde.serialize_model(result.model), rel=1e-5)
    again = UpgradeOpsetPass()(result.model)
    assert not again.modified


def test_opset_11_model_quantises_per_channel_after_conversion(tmp_path):
    onnx.save(conv_gemm(11), tmp_path / "old.onnx")
    # random inputs: 1000 samples for a classifier, where this int8 disagrees on about 1%
    result = dlopt("compile", "old.onnx", "-o", "out", "--precision", "int8", "--runs", "5", "--json",
                   "--max-accuracy-drop", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    upgrade = next(p for p in report["passes"] if p["name"] == "UpgradeOpsetPass")
    assert upgrade["modified"] and upgrade["note"].startswith("opset 11 -> 13")
    int8 = onnx.load(tmp_path / "out" / "model.onnx")
    assert int8.opset_import[0].version == 13
    onnx.checker.check_model(int8)
    inits = {t.name: t for t in int8.graph.initializer}
    per_channel = [n for n in int8.graph.node if n.op_type == "DequantizeLinear"
                   and len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1]
    # the Conv's 8 output channels (weights and bias) and the Gemm's 10 each get their own scale
    assert sorted(inits[n.input[1]].dims[0] for n in per_channel) == [8, 8, 10]
    chosen = next(c for c in report["candidates"] if c["artifact_dir"] == ".")
    assert chosen["precision"] == "int8" and chosen["score"]["drop_pp"] <= 1.0


def test_quantiser_falls_back_to_per_tensor_below_opset_13(tmp_path):
    from dlopt.flow.ranges import compute_ranges

    old = conv_gemm(11)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    compute_ranges(old, feeds, tmp_path / "ranges.json")
    quantise = QuantizeStaticPass(ranges=tmp_path / "ranges.json")
    result = quantise(ir.serde.deserialize_model(old))
    assert quantise.note.endswith("per-tensor weights (opset 11 < 13)")
    proto = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(proto)  # valid: no axis attribute below opset 13
    assert not any(a.name == "axis" for n in proto.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)
