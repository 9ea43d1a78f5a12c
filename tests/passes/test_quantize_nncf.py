"""QuantizeNncfPass on real NNCF and ONNX Runtime: QDQ placement, exclusions, transformers, errors."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("nncf", reason="nncf is not installed (pip install dlopt[nncf])")

from helpers import run_ort, to_proto  # noqa: E402

from dlopt.core.errors import CompileError, DataError  # noqa: E402
from dlopt.passes import generic_passes  # noqa: E402
from dlopt.passes.quantize_nncf import QuantizeNncfPass, available  # noqa: E402
from dlopt.core.pipeline import run_pipeline  # noqa: E402


def _model(nodes, x_shape, y_shape, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _generic(proto: onnx.ModelProto) -> bytes:
    return to_proto(run_pipeline(ir.serde.deserialize_model(proto), generic_passes()).model).SerializeToString()


def _cnn() -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(_cnn_bytes()))


def _attention_block() -> ir.Model:
    return ir.serde.deserialize_model(onnx.load_from_string(_attention_bytes()))


@functools.lru_cache(maxsize=1)  # generic passes take seconds here; each test gets its own copy
def _cnn_bytes(seed: int = 0) -> bytes:
    """conv1 -> Relu -> conv2 -> Relu -> GlobalAveragePool -> Flatten -> MatMul+Add, after generic passes."""
    rng = np.random.default_rng(seed)
    inits = [_init("w1", rng.standard_normal((8, 3, 3, 3)) * 0.3), _init("b1", rng.standard_normal(8) * 0.1),
             _init("w2", rng.standard_normal((16, 8, 3, 3)) * 0.2), _init("b2", rng.standard_normal(16) * 0.1),
             _init("fc_w", rng.standard_normal((16, 10)) * 0.3), _init("fc_b", rng.standard_normal(10) * 0.1)]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
             helper.make_node("MatMul", ["f", "fc_w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_bias")]
    return _generic(_model(nodes, ["N", 3, 16, 16], ["N", 10], inits))


@functools.lru_cache(maxsize=1)
def _attention_bytes(seed: int = 0, d: int = 32, seq: int = 16) -> bytes:
    """LayerNorm -> q/k/v projections -> Softmax(q k^T * s) v -> output projection -> residual Add -> LayerNorm."""
    rng = np.random.default_rng(seed)
    inits = [_init("ln1_g", rng.uniform(0.5, 1.5, d)), _init("ln1_b", rng.standard_normal(d) * 0.1),
             _init("ln2_g", rng.uniform(0.5, 1.5, d)), _init("ln2_b", rng.standard_normal(d) * 0.1),
             _init("scale", np.array(1 / np.sqrt(d)))]
    inits += [_init(n, rng.standard_normal((d, d)) * 0.2) for n in ("wq", "wk", "wv", "wo")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln1_g", "ln1_b"], ["h"], axis=-1, name="ln1"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["h", "wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
             helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
             helper.make_node("Mul", ["s0", "scale"], ["s"], name="scale_mul"),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["a", "v"], ["c"], name="context"),
             helper.make_node("MatMul", ["c", "wo"], ["o"], name="o_proj"),
             helper.make_node("Add", ["o", "x"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "ln2_g", "ln2_b"], ["y"], axis=-1, name="ln2")]
    return _generic(_model(nodes, ["N", seq, d], ["N", seq, d], inits))


def _batches(seed: int, shape: tuple[int, ...], n: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _producers(model) -> dict[str, str]:
    return {o: n.op_type for n in to_proto(model).graph.node for o in n.output}


def _dq_fed(model, node: onnx.NodeProto) -> list[bool]:
    producers = _producers(model)
    return [producers.get(i) == "DequantizeLinear" for i in node.input]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_available_is_true_with_nncf_installed():
    assert available() is True


def test_cnn_is_qdq_and_close_to_float(capfd):
    model = _cnn()
    assert [n.op_type for n in model.graph if n.op_type in ("Conv", "Gemm")] == ["Conv", "Conv", "Gemm"]
    before = to_proto(model).SerializeToString()
    pass_ = QuantizeNncfPass(calibration=_batches(0, (4, 3, 16, 16)))
    result = pass_(model)
    assert capfd.readouterr() == ("", "")  # no progress bars, no INFO lines
    assert to_proto(model).SerializeToString() == before  # the input model is untouched
    quantized = to_proto(result.model)
    for node in quantized.graph.node:
        if node.op_type == "Conv":
            assert _dq_fed(quantized, node)[:2] == [True, True], node.name  # activation and weight
        if node.op_type == "Gemm":
            assert _dq_fed(quantized, node)[1], "Gemm weight is quantised"
    n_dq = sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node)
    assert n_dq >= 5
    assert pass_.note == f"NNCF 3.4.0 PTQ, 32 calibration samples in 8 batches, {n_dq} DequantizeLinear, " \
                         "0 node(s) kept in float"
    assert pass_.quantiser == "nncf 3.4.0"
    x = _batches(99, (16, 3, 16, 16), 1)[0]
    ref, got = run_ort(model, x)[0], run_ort(result.model, x)[0]
    assert _cosine(ref, got) > 0.99
    assert float(np.abs(ref - got).max() / np.abs(ref).max()) < 0.1


def test_excluded_conv_stays_float():
    model = _cnn()
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    result = QuantizeNncfPass(calibration=_batches(0, (4, 3, 16, 16), 4),
                              exclude_nodes=[convs[1], "no_such_node"])(model)
    quantized = to_proto(result.model)
    by_name = {n.name: n for n in quantized.graph.node}
    assert _dq_fed(quantized, by_name[convs[1]])[:2] == [False, False]  # kept in float, weight too
    assert _dq_fed(quantized, by_name[convs[0]])[:2] == [True, True]
    gemm = next(n for n in quantized.graph.node if n.op_type == "Gemm")
    assert _dq_fed(quantized, gemm)[1]


def test_transformer_quantises_weight_matmuls_not_softmax_or_layernorm():
    model = _attention_block()
    weight_matmuls = [n.name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].is_initializer()]
    assert len(weight_matmuls) >= 2
    pass_ = QuantizeNncfPass(calibration=_batches(0, (4, 16, 32)), transformer=True)
    result = pass_(model)
    quantized = to_proto(result.model)
    by_name = {n.name: n for n in quantized.graph.node}
    producers = _producers(quantized)
    for name in weight_matmuls:  # weight per channel and SmoothQuant-scaled activation, both through QDQ
        assert _dq_fed(quantized, by_name[name]) == [True, True], name
    smooth = [n for n in quantized.graph.node if n.op_type == "Mul" and "nncf_smooth_quant" in n.name]
    assert len(smooth) == len(weight_matmuls)
    # q @ k^T is quantised (symmetric) on both activations; softmax @ v, the attention output, is not
    assert _dq_fed(quantized, by_name["scores"])[0]
    assert _dq_fed(quantized, by_name["context"]) == [False, False]
    for node in quantized.graph.node:
        if node.op_type in ("Softmax", "LayerNormalization", "Add"):
            assert not any(_dq_fed(quantized, node)), node.name
    assert producers[by_name["softmax"].input[0]] == "Mul"
    assert "transformer: SmoothQuant alpha 0.95 on MatMul" in pass_.note
    x = _batches(99, (8, 16, 32), 1)[0]
    assert _cosine(run_ort(model, x)[0], run_ort(result.model, x)[0]) > 0.99

    # without the transformer recipe NNCF quantises the residual Add and the softmax output too
    plain = to_proto(QuantizeNncfPass(calibration=_batches(0, (4, 16, 32)))(model).model)
    plain_nodes = {n.name: n for n in plain.graph.node}
    assert all(_dq_fed(plain, plain_nodes["residual"]))
    assert _dq_fed(plain, plain_nodes["context"])[0]


def test_cast_of_initializer_is_folded_before_nncf():
    # dlopt's generic passes fold such Casts unless they are too big; NNCF's eliminate_nop_cast
    # raises AttributeError on them, so the pass folds them itself.
    rng = np.random.default_rng(0)
    w16 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float16), "w16")
    nodes = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = ir.serde.deserialize_model(_model(nodes, ["N", 16], ["N", 8], [w16], opset=13))
    pass_ = QuantizeNncfPass(calibration=_batches(0, (4, 16), 4))
    result = pass_(model)
    quantized = to_proto(result.model)
    assert [n.op_type for n in quantized.graph.node].count("Cast") == 0
    assert _dq_fed(quantized, next(n for n in quantized.graph.node if n.op_type == "MatMul")) == [True, True]
    assert pass_.note.endswith("; 1 Cast(s) of initializers folded")
    assert [n.op_type for n in model.graph] == ["Cast", "MatMul"]  # input untouched


def test_wrong_input_name_is_one_line_compile_error():
    with pytest.raises(CompileError) as info:
        QuantizeNncfPass(calibration=[{"images": np.zeros((2, 3, 16, 16), np.float32)}])(_cnn())
    message = str(info.value)
    assert message.startswith("NNCF quantisation failed: ") and "\n" not in message
    assert "images" in message


def test_no_calibration_batches_is_a_data_error():
    with pytest.raises(DataError, match="^NNCF quantisation needs at least one calibration batch$"):
        QuantizeNncfPass(calibration=[])(_cnn())


def test_import_does_not_import_nncf():
    probe = "import sys, dlopt.passes.quantize_nncf as q; print(q.available(), 'nncf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True False"


def test_nncf_telemetry_is_off_and_writes_nothing_at_home(tmp_path):
    # Without the opt-out, importing nncf writes ~/intel/stats and ~/intel/openvino_ga_cid.
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI", "NNCF_DEV")}
    env["HOME"] = str(tmp_path)
    probe = ("import os; from dlopt.passes.quantize_nncf import _import_nncf; _import_nncf(); "
             "from nncf.telemetry import decorator, wrapper; "
             "print(isinstance(decorator.telemetry, wrapper.NNCFTelemetryStub), os.environ.get('CI'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env,
                         cwd=tmp_path).stdout
    assert out.strip() == "True None"
    assert not (tmp_path / "intel").exists()


def test_a_reiterable_source_is_streamed_not_held():
    """A dataset without len (like an .npz dataset before its first read) is read batch by batch:
    the pass keeps the source itself, counts it, and NNCF's result equals the one from a list."""

    class Source:
        reads = 0

        def __iter__(self):
            Source.reads += 1
            yield from _batches(0, (4, 3, 16, 16))

    source = Source()
    pass_ = QuantizeNncfPass(calibration=source)
    assert pass_.calibration is source
    streamed = to_proto(pass_(_cnn()).model)
    listed = to_proto(QuantizeNncfPass(calibration=_batches(0, (4, 3, 16, 16)))(_cnn()).model)
    assert Source.reads >= 2  # counted, then read by NNCF
    n = len(_batches(0, (4, 3, 16, 16)))
    assert f"{4 * n} calibration samples in {n} batches" in pass_.note
    x = _batches(5, (4, 3, 16, 16), 1)[0]
    np.testing.assert_array_equal(run_ort(streamed, x)[0], run_ort(listed, x)[0])


def test_an_onnx_model_is_quantised_without_importing_torch():
    """nncf imports torch whenever it is installed; an ONNX model needs none of it. In a fresh process the pass
    quantises without torch in sys.modules, and torch imports as usual afterwards."""
    probe = ("import sys, numpy as np, onnx_ir as ir, models; from dlopt.passes.quantize_nncf import QuantizeNncfPass; "
             "m = ir.serde.deserialize_model(models.conv_bn_relu()); "
             "feeds = [{'x': np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)} for i in range(4)]; "
             "out = QuantizeNncfPass(calibration=feeds)(m).model; "
             "q = sum(n.op_type == 'QuantizeLinear' for n in out.graph); "
             "hidden = 'torch' in sys.modules; import torch; "
             "print(q, hidden, torch.ones(2).sum().item())")
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tests, timeout=300,
                          env={**os.environ, "PYTHONPATH": tests})
    assert done.returncode == 0, done.stderr
    q, hidden, total = done.stdout.split()
    assert int(q) >= 2 and hidden == "False" and float(total) == 2.0, done.stdout
