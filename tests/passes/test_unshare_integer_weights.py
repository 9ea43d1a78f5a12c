"""UnshareIntegerWeightsPass: a model ONNX Runtime quantised (two DynamicQuantizeLSTM), whose equal
constants dlopt's generic passes merged, loads again in an ORT session with session.x64quantprecision
(which every ORT session dlopt opens or ships sets)."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dlopt.passes import generic_passes
from dlopt.passes.unshare_integer_weights import UnshareIntegerWeightsPass
from dlopt.core.pipeline import run_pipeline

H, I, T = 16, 8, 5


def _two_lstms(path) -> None:
    rng = np.random.default_rng(0)
    nodes, inits = [], [numpy_helper.from_array(np.array([1], np.int64), "axis")]
    for name, inp, out, size in (("l1", "x", "y1", I), ("l2", "s1", "y2", H)):
        inits += [numpy_helper.from_array((rng.standard_normal((1, 4 * H, size)) * 0.3).astype(np.float32), name + "W"),
                  numpy_helper.from_array((rng.standard_normal((1, 4 * H, H)) * 0.3).astype(np.float32), name + "R"),
                  numpy_helper.from_array(np.zeros((1, 8 * H), np.float32), name + "B")]
        nodes.append(helper.make_node("LSTM", [inp, name + "W", name + "R", name + "B"], [out], hidden_size=H))
        if name == "l1":
            nodes.append(helper.make_node("Squeeze", ["y1", "axis"], ["s1"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, 1, I])],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def _session(model: ir.Model):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def test_merged_constants_of_integer_ops_are_copied_and_the_session_loads(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _two_lstms(tmp_path / "lstm.onnx")
    quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    quantised = ir.load(tmp_path / "q.onnx")
    assert [n.op_type for n in quantised.graph].count("DynamicQuantizeLSTM") == 2
    x = {"x": np.random.default_rng(1).standard_normal((T, 1, I)).astype(np.float32)}
    expected = _session(quantised).run(None, x)[0]
    merged = run_pipeline(quantised, generic_passes(model=quantised)).model
    with pytest.raises(Exception, match="Attempt to replace the existing tensor"):
        _session(merged)
    result = UnshareIntegerWeightsPass()(merged)
    assert result.modified
    np.testing.assert_allclose(_session(result.model).run(None, x)[0], expected, rtol=1e-6, atol=1e-6)
    assert not UnshareIntegerWeightsPass()(result.model).modified  # nothing left to copy
