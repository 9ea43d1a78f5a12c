"""INT8 static/dynamic and FP16 passes on real ONNX Runtime: op counts and accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import models
from helpers import max_rel_error, op_counts, run_ort, to_proto

from dlopt.passes import FoldBatchNormPass
from dlopt.passes.fp16 import ConvertFloat16Pass
from dlopt.passes.quantize_dynamic import QuantizeDynamicPass
from dlopt.passes.quantize_static import QuantizeStaticPass
from dlopt.flow.ranges import compute_ranges


def _conv_model() -> ir.Model:
    return FoldBatchNormPass()(ir.serde.deserialize_model(models.conv_bn_relu(channels=16, size=32, batch="N"))).model


def _batches(seed: int, n: int = 16):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def ranges(tmp_path_factory):
    path = tmp_path_factory.mktemp("ranges") / "calibration.json"
    stats = compute_ranges(ir.serde.serialize_model(_conv_model()), _batches(0), path)
    assert stats.samples == 64 and stats.batches == 16
    return path


def test_static_int8_is_qdq_per_channel_and_close(ranges):
    model = _conv_model()
    result = QuantizeStaticPass(ranges=ranges)(model)
    counts = op_counts(result.model)
    assert counts["QuantizeLinear"] >= 3 and counts["DequantizeLinear"] >= 5
    weight_dq = [n for n in to_proto(result.model).graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")]
    assert weight_dq, "conv weight is quantised"
    scales = {i.name: i for i in to_proto(result.model).graph.initializer}
    assert len(scales[weight_dq[0].input[1]].dims) == 1 and scales[weight_dq[0].input[1]].dims[0] == 16  # per channel
    x = _batches(9, 1)[0]["x"]
    ref, got = run_ort(model, {"x": x})[0], run_ort(result.model, {"x": x})[0]
    assert max_rel_error(ref, got) < 0.05
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.75


def test_excluded_node_stays_float(ranges):
    model = _conv_model()
    conv = next(n.name for n in model.graph if n.op_type == "Conv")
    result = QuantizeStaticPass(ranges=ranges, exclude_nodes=[conv])(model)
    node = next(n for n in to_proto(result.model).graph.node if n.name == conv)
    producers = {o: n.op_type for n in to_proto(result.model).graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in node.input)
    assert result.model is not model


def test_only_nodes_quantises_just_those(ranges):
    model = _conv_model()
    conv = next(n.name for n in model.graph if n.op_type == "Conv")
    result = QuantizeStaticPass(ranges=ranges, only_nodes=[conv])(model)
    proto = to_proto(result.model)
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    quantised = {n.op_type for n in proto.graph.node
                 if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                 and any(producers.get(i) == "DequantizeLinear" for i in n.input)}
    # the conv runs on int8 data (and its quantised output feeds the Relu); the dense layer does not
    assert "Conv" in quantised and not quantised & {"Gemm", "MatMul"}


def test_calibration_methods_give_different_ranges(tmp_path):
    proto = ir.serde.serialize_model(_conv_model())
    import json

    highs = {}
    for method in ("minmax", "entropy", "percentile"):
        compute_ranges(proto, _batches(0), tmp_path / f"{method}.json", method=method)
        data = json.loads((tmp_path / f"{method}.json").read_text())
        assert data, method
        highs[method] = json.dumps(data, sort_keys=True)
    assert len(set(highs.values())) == 3


def test_streamed_calibration_matches_onnxruntime_one_shot(tmp_path):
    """Feeding the calibrator batch by batch gives ORT's own min/max ranges."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    proto = ir.serde.serialize_model(_conv_model())
    compute_ranges(proto, _batches(3, 20), tmp_path / "ours.json")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(_batches(3, 20))

        def get_next(self):
            return next(self.it, None)

    quantize_static(proto, tmp_path / "q.onnx", Reader(), quant_format=QuantFormat.QDQ,
                    calibration_cache_path=tmp_path / "ort.json")
    ours, theirs = load_tensors_data(tmp_path / "ours.json").data, load_tensors_data(tmp_path / "ort.json").data
    assert set(ours) == set(theirs)
    for name in ours:
        np.testing.assert_allclose(ours[name].range_value, theirs[name].range_value, rtol=1e-6)


def test_fp16_keeps_io_types_and_accuracy():
    model = _conv_model()
    result = ConvertFloat16Pass()(model)
    proto = to_proto(result.model)
    assert proto.graph.input[0].type.tensor_type.elem_type == 1  # float32 in
    assert proto.graph.output[0].type.tensor_type.elem_type == 1  # float32 out
    w = next(i for i in proto.graph.initializer if i.name.startswith("w"))
    assert w.data_type == 10  # float16 weights
    x = _batches(4, 1)[0]["x"]
    assert max_rel_error(run_ort(model, {"x": x})[0], run_ort(result.model, {"x": x})[0]) < 5e-3


def test_dynamic_int8_on_matmul_model():
    model = ir.serde.deserialize_model(models.outlier_mlp())
    result = QuantizeDynamicPass()(model)
    assert op_counts(result.model).get("MatMulInteger") == 3
    assert result.modified


def test_dynamic_quantisation_is_per_channel_and_keeps_small_columns():
    """Weight columns 1000x apart: one scale zeroes the small ones, a scale per column keeps them."""
    from onnx import TensorProto, helper

    from dlopt.passes.quantize_dynamic import QuantizeDynamicPass

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    w[:, 16:] *= 1e-3
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
                              [helper.make_tensor("w", TensorProto.FLOAT, [64, 32], w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    (ref,) = run_ort(model, feed)

    def small_column_error(per_channel):
        quantise = QuantizeDynamicPass(per_channel=per_channel)
        (got,) = run_ort(quantise(ir.serde.deserialize_model(model)).model, feed)
        return float(np.abs(got[:, 16:] - ref[:, 16:]).max() / np.abs(ref[:, 16:]).max()), quantise.note

    per_tensor, note_t = small_column_error(False)
    per_channel, note_c = small_column_error(True)
    assert note_c.endswith("per-channel weights") and note_t.endswith("per-tensor weights")
    assert per_tensor > 0.5 and per_channel < 0.05, (per_tensor, per_channel)
    assert QuantizeDynamicPass().per_channel


def test_initializer_named_like_a_quantisation_scale_is_not_reused(tmp_path):
    # "att" * "att_scale": ONNX Runtime's quantiser would take the constant as att's own scale
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["att"], name="mm"),
         helper.make_node("Mul", ["att", "att_scale"], ["scaled"], name="mul"),
         helper.make_node("MatMul", ["scaled", "w2"], ["y"], name="mm2")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.float32(0.125), "att_scale"),
         onnx.numpy_helper.from_array(w.T.copy(), "w2")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(8)]
    path = tmp_path / "calibration.json"
    compute_ranges(ir.serde.serialize_model(model), feeds, path)
    qpass = QuantizeStaticPass(ranges=path, op_types=["MatMul"])
    result = qpass(model)
    proto = to_proto(result.model)
    mul = next(n for n in proto.graph.node if n.name == "mul")
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert consts[mul.input[1]] == np.float32(0.125)  # the Mul still multiplies by its own constant
    quant_att = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "att")
    assert quant_att.input[1] != mul.input[1]  # att's scale comes from its calibrated range
    assert "renamed 1 initializer" in qpass.note
    x = feeds[0]
    assert max_rel_error(run_ort(model, x)[0], run_ort(result.model, x)[0]) < 0.1


def _erf_model():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "erf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_histogram_calibration_with_nothing_to_calibrate_is_a_compile_error_and_compile_goes_on(tmp_path):
    """An Erf-only model: ORT's histogram calibrators raised a bare ValueError (dlopt exit 70).
    Since the recipe calls a graph attention only when a Softmax feeds a MatMul, auto gives it
    min-max ranges, which need nothing of the kind."""
    import dlopt
    from dlopt.core.errors import CompileError

    feeds = [{"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}]
    with pytest.raises(CompileError, match="percentile calibration found no Conv, MatMul tensors to calibrate"):
        compute_ranges(_erf_model(), feeds, tmp_path / "r.json", method="percentile", op_types=["Conv", "MatMul"])
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort"]\n')
    report = dlopt.compile(_erf_model(), target="here", targets_file=tmp_path / "t.toml", out=tmp_path / "out",
                           runs=3, samples=4, cache=False)
    assert report.chosen == "ort/fp32"  # int8 quantises nothing here; the simpler precision ships on a tie
    assert report.calibration["method"] == "minmax"


def _if_model() -> onnx.ModelProto:
    """Conv -> Relu -> ReduceMean in the main graph, then an If on a scalar ``sr`` whose branches read
    the pooled tensor from the outer scope (Identity, or Mul by an initializer), then a MatMul."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32) * 0.3, "m"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(8000, np.int64), "thr")]
    then_g = helper.make_graph([helper.make_node("Identity", ["pooled"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Mul", ["pooled", "two"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("ReduceMean", ["r"], ["p4"], axes=[2, 3], keepdims=0, name="pool"),
             helper.make_node("Identity", ["p4"], ["pooled"], name="id"),
             helper.make_node("Greater", ["sr", "thr"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("MatMul", ["branch", "m"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "if_model",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16]),
                               helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_static_int8_of_a_model_with_an_if_on_a_scalar_input(tmp_path):
    # ORT's quantiser sorted the If before the Identity its branches read ("Nodes in a graph must be
    # topologically sorted"): the main graph is quantised, the branches stay float and run
    proto = _if_model()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32), "sr": np.array(sr, np.int64)}
               for sr in (16000, 8000) * 6]  # both branches in the calibration data
    compute_ranges(proto, batches, tmp_path / "calibration.json")
    quant = QuantizeStaticPass(ranges=tmp_path / "calibration.json")
    result = quant(ir.serde.deserialize_model(proto))
    out = to_proto(result.model)
    onnx.checker.check_model(out, full_check=True)
    counts = op_counts(result.model)
    assert counts["If"] == 1 and counts["QuantizeLinear"] >= 3  # x, r and the If's output
    weight_dq = {n.output[0] for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("w")}
    assert any(i in weight_dq for n in out.graph.node if n.op_type == "Conv" for i in n.input)
    branches = [g for n in out.graph.node if n.op_type == "If" for a in n.attribute for g in [a.g]]
    assert sorted(n.op_type for g in branches for n in g.node) == ["Identity", "Mul"]  # float, as they were
    assert "1 subgraph(s) kept in float" in quant.note
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    for sr in (16000, 100):  # then and else branch
        feeds = {"x": x, "sr": np.array(sr, np.int64)}
        ref, got = run_ort(proto, feeds)[0], run_ort(result.model, feeds)[0]
        assert max_rel_error(ref, got) < 0.05, sr


def test_static_int8_that_quantises_nothing_says_so_instead_of_shipping_float_as_int8(tmp_path):
    """silero-vad: every op INT8 could take sits in an If branch (which stays float); the candidate fails
    naming that, instead of an 'ok' int8 with 0 DequantizeLinear."""
    from onnx import TensorProto, helper, numpy_helper

    from dlopt.core.errors import CompileError

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Greater", ["sr", "thr"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w, numpy_helper.from_array(np.array(5, np.int64), "thr")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    compute_ranges(proto, [{"x": rng.standard_normal((2, 4)).astype(np.float32), "sr": np.array(16000)}
                           for _ in range(4)], tmp_path / "calibration.json")
    with pytest.raises(CompileError, match=r"^INT8 quantised nothing: no op of the main graph could take INT8 "
                                           r"\(1 If/Loop subgraph\(s\) stay float\)$"):
        QuantizeStaticPass(ranges=tmp_path / "calibration.json")(ir.serde.deserialize_model(proto))
