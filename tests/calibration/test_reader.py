"""as_reader() is a real ORT CalibrationDataReader: quantize_static accepts it and the result runs."""

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import CalibrationDataReader

from dlopt.calibration import open_dataset
from dlopt.core.specs import input_specs


def _conv_model(seed=0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["conv"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _run(model_path, x):
    from dlopt.core.ort_sessions import cpu_session_options

    options = cpu_session_options()  # exact int8 kernels on x86 CPUs without VNNI
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture
def setup(tmp_path):
    model = _conv_model()
    onnx.save(model, tmp_path / "float.onnx")
    x = np.random.default_rng(1).standard_normal((20, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    return tmp_path, input_specs(model), x


def test_reader_protocol(setup):
    tmp_path, specs, x = setup
    reader = open_dataset(tmp_path / "calib.npz", specs, limit=5, batch_size=2).as_reader()
    assert isinstance(reader, CalibrationDataReader) and CalibrationDataReader in type(reader).__mro__
    assert len(reader) == 3
    got = [reader.get_next()["x"] for _ in range(3)]
    assert reader.get_next() is None and reader.get_next() is None
    np.testing.assert_array_equal(np.concatenate(got), x[:5])
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], x[:2])
    twin = copy.deepcopy(reader)  # a fresh reader, as ORT's SmoothQuant takes one
    np.testing.assert_array_equal(twin.get_next()["x"], x[:2])
    reader.set_range(1, 2)
    np.testing.assert_array_equal(reader.get_next()["x"], x[2:4])
    assert reader.get_next() is None
    assert [len(feed["x"]) for feed in open_dataset([{"x": x}], specs, batch_size=8).as_reader()] == [8, 8, 4]


def test_quantize_static_accepts_the_reader(setup):
    tmp_path, specs, x = setup
    reader = open_dataset(tmp_path / "calib.npz", specs, limit=16).as_reader()
    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "int8.onnx"), reader,
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    ops = [node.op_type for node in onnx.load(tmp_path / "int8.onnx").graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 3 and "Conv" in ops
    probe = x[16:]  # samples calibration did not see
    ref, got = _run(tmp_path / "float.onnx", probe), _run(tmp_path / "int8.onnx", probe)
    assert got.shape == ref.shape == (4, 4, 8, 8)
    error = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    assert 0 < error < 0.05, error  # quantised (not identical), yet close
