"""Per-layer INT8 error from cached float activations, on real ONNX Runtime."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from helpers import run_ort

from dlopt.passes.quantize_static import QuantizeStaticPass
from dlopt.flow.ranges import compute_ranges
from dlopt.flow.sensitivity import NodeSensitivity, layer_errors, rank


def _feeds(seed: int, n: int = 4, rows: int = 8):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 16)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """models.outlier_mlp: dense2 reads a tensor whose channel 0 sits near 1000, the rest near 1."""
    model = ir.serde.deserialize_model(models.outlier_mlp())
    path = tmp_path_factory.mktemp("ranges") / "calibration.json"
    compute_ranges(ir.serde.serialize_model(model), _feeds(0, 8), path)
    return model, QuantizeStaticPass(ranges=path)(model).model


def test_the_layer_reading_the_outlier_ranks_first(outlier):
    model, int8 = outlier
    errors, samples = layer_errors(model, int8, _feeds(1), threads=1)
    assert samples == 8  # capped: 8 rows of the first feed
    by_name = {s.name: s.error for s in errors}
    assert set(by_name) == {"dense0", "dense0_bias", "dense1", "dense1_bias", "dense2", "dense2_bias"}
    assert all(math.isfinite(e) and e >= 0 for e in by_name.values())
    ranked = rank(errors)
    assert ranked[0].name == "dense2" and ranked[0].op_type == "MatMul"
    assert by_name["dense2"] > 0.05
    assert all(by_name["dense2"] > 10 * e for name, e in by_name.items() if name != "dense2")
    assert by_name["dense0"] < 1e-3 and by_name["dense1"] < 1e-3  # well-behaved layers: small, but measured


def test_the_float_model_is_left_as_it_was(outlier):
    model, int8 = outlier
    before = ir.serde.serialize_model(model).SerializeToString()
    layer_errors(model, int8, _feeds(2, n=1), threads=1)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert [v.name for v in model.graph.outputs] == ["logits"]


def _nncf_style(scale_x: float, scale_w: np.ndarray, w: np.ndarray):
    """A float MatMul and its INT8 twin with Q -> DQ pairs on both the activation and the weight."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    ops = [helper.make_opsetid("", 13)]
    fmodel = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "f",
                                                 [x], [y], [numpy_helper.from_array(w, "w")]), opset_imports=ops)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(scale_x), "sx"),
             numpy_helper.from_array(np.uint8(128), "zx"), numpy_helper.from_array(scale_w, "sw"),
             numpy_helper.from_array(np.zeros(3, np.int8), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("QuantizeLinear", ["w", "sw", "zw"], ["wq"], axis=1),
             helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    qmodel = helper.make_model(helper.make_graph(nodes, "q", [x], [y], inits), opset_imports=ops)
    for m in (fmodel, qmodel):
        m.ir_version = 8
    return ir.serde.deserialize_model(fmodel), ir.serde.deserialize_model(qmodel), qmodel


def test_qdq_pairs_on_weights_replay_exactly():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    scale_w = (np.abs(w).max(0) / 127).astype(np.float32)
    fmodel, qmodel, qproto = _nncf_style(0.05, scale_w, w)
    feeds = [{"x": rng.standard_normal((6, 4)).astype(np.float32)} for _ in range(2)]
    errors, samples = layer_errors(fmodel, qmodel, feeds, threads=1)
    assert samples == 8 and [(s.name, s.op_type) for s in errors] == [("mm", "MatMul")]
    # the per-layer error is exactly that of the whole INT8 model here: it is one layer
    ref = np.concatenate([f["x"] for f in feeds])[:8] @ w
    got = run_ort(qproto, {"x": np.concatenate([f["x"] for f in feeds])[:8]})[0]
    expected = float(np.sum((got.astype(np.float64) - ref) ** 2) / np.sum(ref.astype(np.float64) ** 2))
    assert errors[0].error == pytest.approx(expected, rel=1e-4)
    assert 1e-6 < expected < 1e-2


def test_unmeasured_nodes_sort_last():
    nodes = [NodeSensitivity("a", "MatMul", math.nan), NodeSensitivity("b", "Add", 0.1),
             NodeSensitivity("c", "Conv", 0.3), NodeSensitivity("d", "If", math.nan)]
    assert [s.name for s in rank(nodes)] == ["c", "b", "a", "d"]
    assert nodes[0].to_dict() == {"name": "a", "op_type": "MatMul", "error": None}


def test_a_node_it_cannot_replay_is_nan_not_an_error():
    w = np.eye(4, 3, dtype=np.float32)
    fmodel, qmodel, _ = _nncf_style(0.05, np.full(3, 0.01, np.float32), w)
    next(n for n in qmodel.graph if n.op_type == "MatMul").name = "renamed"  # no float twin to replay
    errors, _ = layer_errors(fmodel, qmodel, [{"x": np.ones((2, 4), np.float32)}], threads=1)
    assert len(errors) == 1 and errors[0].name == "renamed" and math.isnan(errors[0].error)
