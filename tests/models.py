"""Tiny ONNX models built in code for the tests (no files, no downloads)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, initializers, name="test") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dlopt-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_bn_relu(channels: int = 8, size: int = 16, seed: int = 0, batch: int | str = 1) -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> MatMul+Add (2-D)."""
    rng = np.random.default_rng(seed)
    c = channels
    inits = [
        _init("w", rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3),
        _init("b", rng.standard_normal(c).astype(np.float32) * 0.1),
        _init("gamma", rng.uniform(0.5, 1.5, c).astype(np.float32)),
        _init("beta", rng.standard_normal(c).astype(np.float32) * 0.1),
        _init("mean", rng.standard_normal(c).astype(np.float32) * 0.1),
        _init("var", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        _init("fc_w", rng.standard_normal((c, 10)).astype(np.float32) * 0.3),
        _init("fc_b", rng.standard_normal(10).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-5, name="bn"),
        helper.make_node("Relu", ["bn"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], axis=1, name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["mm"], name="fc_matmul"),
        helper.make_node("Add", ["mm", "fc_b"], ["logits"], name="fc_add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    return _model(nodes, [x], [y], inits, name="conv_bn_relu")


def foldable_constants(seed: int = 0) -> onnx.ModelProto:
    """y = x * (a + b) + Identity(c): the Add of constants and the Identity simplify away."""
    rng = np.random.default_rng(seed)
    inits = [_init(n, rng.standard_normal((4,)).astype(np.float32)) for n in ("a", "b", "c")]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["ab"]),
        helper.make_node("Mul", ["x", "ab"], ["xab"]),
        helper.make_node("Identity", ["c"], ["c2"]),
        helper.make_node("Add", ["xab", "c2"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    return _model(nodes, [x], [y], inits, name="foldable")


def gemm_activation(activation: str = "Relu", seed: int = 0, **attrs) -> onnx.ModelProto:
    """Gemm -> activation, for the ORT activation fusion."""
    rng = np.random.default_rng(seed)
    inits = [_init("w", rng.standard_normal((6, 5)).astype(np.float32)),
             _init("b", rng.standard_normal(5).astype(np.float32))]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]),
             helper.make_node(activation, ["g"], ["y"], **attrs)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])
    return _model(nodes, [x], [y], inits, name="gemm_act")


def save(model: onnx.ModelProto, path) -> str:
    onnx.save(model, str(path))
    return str(path)


def outlier_mlp(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Three dense layers; the middle one's output channel 0 sits near 1000, the rest near 1.

    That channel hardly influences the logits, but per-tensor INT8 of the activation
    spends its whole range on it, so the other channels round to nothing and the
    predictions change: plain INT8 misses any sensible budget.  Keeping the layers
    that produce and consume the outlier in float fixes it; the first layer can
    stay INT8.
    """
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    w1 = rng.standard_normal((16, 32)).astype(np.float32) * 0.5
    b1 = np.zeros(32, np.float32)
    b1[0] = 1000.0
    w2 = rng.standard_normal((32, 10)).astype(np.float32)
    w2[0, :] = 1e-5
    inits = [_init("w0", w0), _init("b0", np.zeros(16, np.float32)), _init("w1", w1), _init("b1", b1),
             _init("w2", w2), _init("b2", rng.standard_normal(10).astype(np.float32) * 0.1)]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["g0"], name="dense0"),
        helper.make_node("Add", ["g0", "b0"], ["g"], name="dense0_bias"),
        helper.make_node("MatMul", ["g", "w1"], ["h0"], name="dense1"),
        helper.make_node("Add", ["h0", "b1"], ["h"], name="dense1_bias"),
        helper.make_node("MatMul", ["h", "w2"], ["l0"], name="dense2"),
        helper.make_node("Add", ["l0", "b2"], ["logits"], name="dense2_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 16])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    return _model(nodes, [x], [y], inits, name="outlier_mlp")


def attention_block(seed: int = 0, dim: int = 32, batch: int | str = "N", seq: int | str = "S") -> onnx.ModelProto:
    """LayerNorm -> Q/K/V MatMuls -> softmax(Q K^T / sqrt(d)) V -> output MatMul + residual.

    What dlopt.flow.recipe calls a transformer: attention, and every weight in a MatMul.
    """
    rng = np.random.default_rng(seed)

    def w(name):
        return _init(name, (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32))

    inits = [w("wq"), w("wk"), w("wv"), w("wo"), _init("gamma", np.ones(dim, np.float32)),
             _init("beta", np.zeros(dim, np.float32)), _init("inv_sqrt_d", np.float32(1 / np.sqrt(dim)))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["n", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="qk"),
        helper.make_node("Mul", ["s0", "inv_sqrt_d"], ["s"], name="scale"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
        helper.make_node("MatMul", ["ctx", "wo"], ["o"], name="out"),
        helper.make_node("Add", ["x", "o"], ["y"], name="residual"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, dim])
    return _model(nodes, [x], [y], inits, name="attention_block")
