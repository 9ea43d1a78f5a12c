"""SmoothQuantPass on real ONNX Runtime: exact in float, and what saves INT8 of a transformer block."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import max_rel_error, op_counts, run_ort, to_proto

from dlopt.core.errors import CompileError, ConfigError, DataError
from dlopt.passes.quantize_static import QuantizeStaticPass
from dlopt.passes.smooth_quant import SmoothQuantPass
from dlopt.flow.ranges import compute_ranges

D, S = 64, 16
HOT = [5, 37]  # LayerNorm channels with outliers, like BERT's
OUTLIER = 60.0


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> ir.Model:
    proto = helper.make_model(helper.make_graph(nodes, "smooth", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _io(name: str, *shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def transformer_block(seed: int = 0) -> ir.Model:
    """LN -> Q/K/V -> attention -> out proj -> residual -> LN -> FFN (erf GELU) -> residual.

    Both LayerNorms' gammas carry two channels ``OUTLIER`` times larger than the rest,
    and the weight rows reading them are that much smaller (what trained BERTs look
    like): the float function hardly depends on them, but per-tensor INT8 of the LN
    output spends its range on them.
    """
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def init(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def layer_norm(name, x, out):
        gamma = 1 + 0.1 * rng.standard_normal(D)
        beta = 0.1 * rng.standard_normal(D)
        gamma[HOT] *= OUTLIER
        beta[HOT] *= OUTLIER / 10
        return helper.make_node("LayerNormalization", [x, init(name + "_g", gamma), init(name + "_b", beta)],
                                [out], name=name, axis=-1, epsilon=1e-5)

    def weight(name, k, n, hot_rows=False):
        w = rng.standard_normal((k, n)) / np.sqrt(k)
        if hot_rows:
            w[HOT] /= OUTLIER
        return init(name, w)

    node = helper.make_node
    nodes = [layer_norm("ln1", "x", "h")]
    nodes += [node("MatMul", ["h", weight("w" + p, D, D, True)], [p], name=p + "_proj") for p in "qkv"]
    nodes += [
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="kt"),
        node("MatMul", ["q", "kt"], ["qk"], name="qk"),
        # not "att_scale": ORT's QDQ quantiser names the scale of tensor "att" so and reuses a
        # model initializer of that name (an ORT name clash, not a SmoothQuant matter)
        node("Mul", ["qk", init("inv_sqrt_d", np.array(1 / np.sqrt(D)))], ["qks"], name="qk_scale"),
        node("Softmax", ["qks"], ["att"], axis=-1, name="softmax"),
        node("MatMul", ["att", "v"], ["ctx"], name="att_v"),
        node("MatMul", ["ctx", weight("wo", D, D)], ["o"], name="o_proj"),
        node("Add", ["x", "o"], ["r1"], name="res1"),
        layer_norm("ln2", "r1", "h2"),
        node("MatMul", ["h2", weight("w1", D, 4 * D, True)], ["f1"], name="ffn1"),
        node("Mul", ["f1", init("rsqrt2", np.array(1 / np.sqrt(2)))], ["f1s"], name="gelu_scale"),
        node("Erf", ["f1s"], ["erf"], name="gelu_erf"),
        node("Add", ["erf", init("one", np.array(1.0))], ["erf1"], name="gelu_add"),
        node("Mul", ["f1", "erf1"], ["g0"], name="gelu_mul"),
        node("Mul", ["g0", init("half", np.array(0.5))], ["g"], name="gelu_half"),
        node("MatMul", ["g", weight("w2", 4 * D, D)], ["f2"], name="ffn2"),
        node("Add", ["r1", "f2"], ["y"], name="res2"),
    ]
    return _model(nodes, [_io("x", "B", S, D)], [_io("y", "B", S, D)], inits)


def _feeds(seed: int, n: int, batch: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, S, D)).astype(np.float32)} for _ in range(n)]


CALIBRATION, EVALUATION = _feeds(0, 8), _feeds(1, 4)


def _min_cosine(reference: ir.Model, candidate: ir.Model) -> float:
    cosines = []
    for feed in EVALUATION:
        a = run_ort(reference, feed)[0].reshape(len(feed["x"]), -1).astype(np.float64)
        b = run_ort(candidate, feed)[0].reshape(len(feed["x"]), -1).astype(np.float64)
        cosines += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    return float(min(cosines))


def _int8(model: ir.Model, cache) -> ir.Model:
    """dlopt's transformer recipe: ranges on this float model, then static INT8 of MatMul/Gemm."""
    compute_ranges(model, CALIBRATION, cache)
    return QuantizeStaticPass(ranges=cache, op_types=["MatMul", "Gemm"])(model).model


@pytest.fixture(scope="module")
def block():
    return transformer_block()


@pytest.fixture(scope="module")
def smoothed(block):
    smooth = SmoothQuantPass(calibration=CALIBRATION)
    result = smooth(block)
    assert result.modified
    return smooth, result.model


def test_int8_block_keeps_cosine_only_with_smoothing(block, smoothed, tmp_path):
    plain = _min_cosine(block, _int8(block, tmp_path / "plain.json"))
    smooth = _min_cosine(block, _int8(smoothed[1], tmp_path / "smooth.json"))
    print(f"min per-sample cosine vs float: INT8 {plain:.4f}, SmoothQuant+INT8 {smooth:.4f}")
    assert plain < 0.97, plain  # the outlier channels wipe out the rest of the LN output
    assert smooth >= 0.995, (plain, smooth)


def test_smoothing_is_exact_in_float(block, smoothed):
    for feed in EVALUATION:
        assert max_rel_error(run_ort(block, feed)[0], run_ort(smoothed[1], feed)[0]) < 1e-5


def test_layernorm_producers_are_folded(block, smoothed):
    smooth, model = smoothed
    # ln1 (q/k/v share one s) and ln2 fold; attention's context and the GELU output get a Mul
    assert smooth.smoothed == 4 and smooth.alpha == 0.5
    assert smooth.note == "alpha 0.5: smoothed 4 MatMul/Gemm inputs (2 folded into LayerNorm, 2 Mul inserted)"
    assert op_counts(model)["Mul"] == op_counts(block)["Mul"] + 2
    mul_inputs = {n.inputs[0].name for n in model.graph if n.op_type == "Mul" and n.name.endswith("_smooth_mul")}
    assert mul_inputs == {"ctx", "g"}
    before = {v.name: v.const_value.numpy() for v in block.graph.initializers.values()}
    after = {v.name: v.const_value.numpy() for v in model.graph.initializers.values()}
    ratio = before["ln1_g"] / after["ln1_g"]  # = s
    np.testing.assert_allclose(before["ln1_b"] / after["ln1_b"], ratio, rtol=1e-5)
    assert ratio[HOT].min() > 5 * np.median(ratio)  # the outliers shrink most
    for w in ("wq", "wk", "wv"):  # one s for the three readers of the LN output
        np.testing.assert_allclose(after[w] / before[w], np.broadcast_to(ratio[:, None], (D, D)), rtol=1e-4)


def test_input_model_is_untouched(block, smoothed):
    assert to_proto(block).SerializeToString() == to_proto(transformer_block()).SerializeToString()


def test_activation_matmuls_are_never_smoothed(block, smoothed):
    model = smoothed[1]
    nodes = {n.name: n for n in model.graph}
    assert [v.name for v in nodes["qk"].inputs] == ["q", "kt"]
    assert [v.name for v in nodes["att_v"].inputs] == ["att", "v"]
    a, b = _io("a", 2, 8, 16), _io("b", 2, 16, 4)
    only = _model([helper.make_node("MatMul", ["a", "b"], ["y"])], [a, b], [_io("y", 2, 8, 4)], [])
    feeds = [{"a": np.ones((2, 8, 16), np.float32), "b": np.ones((2, 16, 4), np.float32)}]
    smooth = SmoothQuantPass(calibration=feeds)
    result = smooth(only)
    assert not result.modified and smooth.smoothed == 0
    assert smooth.note == "alpha 0.5: smoothed 0 MatMul/Gemm inputs (0 folded into LayerNorm, 0 Mul inserted)"


def _outlier_input_feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    scale = np.ones(D, np.float32)
    scale[HOT] = OUTLIER
    return [{"x": rng.standard_normal((4, D)).astype(np.float32) * scale} for _ in range(n)]


def test_graph_input_gets_a_mul_and_gemm_trans_b_is_scaled_by_columns():
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((D, 32)).astype(np.float32), "w")
    bt = numpy_helper.from_array(rng.standard_normal((16, D)).astype(np.float32), "bt")  # Gemm B is [N, K]
    c = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "c")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm"),
             helper.make_node("Gemm", ["x", "bt", "c"], ["y1"], name="gemm", transB=1)]
    model = _model(nodes, [_io("x", "N", D)], [_io("y0", "N", 32), _io("y1", "N", 16)], [w, bt, c])
    smooth = SmoothQuantPass(calibration=_outlier_input_feeds(4), alpha=0.6)
    result = smooth(model)
    assert result.modified and smooth.note.endswith("(0 folded into LayerNorm, 1 Mul inserted)")
    assert op_counts(result.model) == {"Mul": 1, "MatMul": 1, "Gemm": 1}
    nodes = {n.name: n for n in result.model.graph}
    assert nodes["mm"].inputs[0] is nodes["gemm"].inputs[0] is nodes["x_smooth_mul"].outputs[0]
    inv_s = nodes["x_smooth_mul"].inputs[1].const_value.numpy()
    new_bt = nodes["gemm"].inputs[1].const_value.numpy()
    np.testing.assert_allclose(new_bt * inv_s[None, :], numpy_helper.to_array(bt), rtol=1e-5)
    for feed in _outlier_input_feeds(2, seed=7):
        for ref, got in zip(run_ort(model, feed), run_ort(result.model, feed), strict=True):
            assert max_rel_error(ref, got) < 1e-5


def test_decomposed_layernorm_affine_is_folded():
    rng = np.random.default_rng(4)
    gamma = np.ones(D, np.float32)
    gamma[HOT] = OUTLIER
    inits = [numpy_helper.from_array(gamma, "gamma"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.standard_normal((D, 8)).astype(np.float32), "w")]
    nodes = [helper.make_node("Mul", ["gamma", "x"], ["scaled"], name="ln_mul"),
             helper.make_node("Add", ["scaled", "beta"], ["h"], name="ln_add"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="mm")]
    model = _model(nodes, [_io("x", "N", D)], [_io("y", "N", 8)], inits, opset=13)
    smooth = SmoothQuantPass(calibration=_outlier_input_feeds(3))
    result = smooth(model)
    assert smooth.note.endswith("(1 folded into LayerNorm, 0 Mul inserted)")
    assert op_counts(result.model) == {"Mul": 1, "Add": 1, "MatMul": 1}
    new_gamma = result.model.graph.initializers["gamma"].const_value.numpy()
    assert new_gamma[HOT].max() < gamma[HOT].max() / 2
    feed = _outlier_input_feeds(1, seed=9)[0]
    assert max_rel_error(run_ort(model, feed)[0], run_ort(result.model, feed)[0]) < 1e-5


def test_other_readers_keep_the_original_activation_and_shared_weights_are_copied():
    rng = np.random.default_rng(5)
    gamma = np.ones(D, np.float32)
    gamma[HOT] = OUTLIER
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(np.zeros(D, np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32) / 8, "w")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], name="ln", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y0"], name="mm0"),
             helper.make_node("Relu", ["h"], ["side"], name="relu"),  # a reader that is not smoothed
             helper.make_node("MatMul", ["side", "w"], ["y1"], name="mm1")]  # shares w
    outputs = [_io("y0", "N", D), _io("y1", "N", D)]
    model = _model(nodes, [_io("x", "N", D)], outputs, inits)
    result = SmoothQuantPass(calibration=_outlier_input_feeds(3))(model)
    graph = result.model.graph
    nodes = {n.name: n for n in graph}
    assert nodes["relu"].inputs[0].name == "h"  # the LN still emits the original X
    np.testing.assert_array_equal(graph.initializers["g"].const_value.numpy(), gamma)
    assert nodes["mm0"].inputs[0].producer().op_type == "Mul"
    assert nodes["mm0"].inputs[1] is not nodes["mm1"].inputs[1]  # each got its own rescaled weight
    feed = _outlier_input_feeds(1, seed=9)[0]
    for ref, got in zip(run_ort(model, feed), run_ort(result.model, feed), strict=True):
        assert max_rel_error(ref, got) < 1e-5


def test_bad_calibration_and_options_are_one_line_errors(block):
    with pytest.raises(CompileError, match=r"^SmoothQuant calibration failed: ") as info:
        SmoothQuantPass(calibration=[{"wrong_name": np.zeros((1, S, D), np.float32)}])(block)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="^SmoothQuant calibration data holds no batches$"):
        SmoothQuantPass(calibration=[])(block)
    with pytest.raises(ConfigError, match="alpha must be between 0 and 1, got 1.5"):
        SmoothQuantPass(calibration=CALIBRATION, alpha=1.5)
