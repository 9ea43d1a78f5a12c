"""ExpandFunctionOpsPass writes an ONNX function op out as its body, with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper

from helpers import op_counts, run_ort

from dlopt.passes.expand_functions import ExpandFunctionOpsPass, has_function_body


def _model(node, inputs, outputs, opset: int = 23) -> ir.Model:
    graph = helper.make_graph([node], "g", inputs, outputs)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_layer_normalization_becomes_its_body_with_the_same_three_outputs():
    model = _model(helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "mean", "inv_std"], axis=-1,
                                    epsilon=1e-3),
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
                    (("x", [2, 3, 4]), ("w", [4]), ("b", [4]))],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "mean", "inv_std")])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.normal(size=(2, 3, 4)).astype(np.float32), "w": rng.normal(size=4).astype(np.float32),
             "b": rng.normal(size=4).astype(np.float32)}
    reference = run_ort(model, feeds)
    expand = ExpandFunctionOpsPass(op_types={"LayerNormalization"})
    result = expand(model)
    assert result.modified and expand.expanded == {"LayerNormalization": 1}
    counts = op_counts(result.model)
    assert "LayerNormalization" not in counts and counts["ReduceMean"] == 2
    for ref, got in zip(reference, run_ort(result.model, feeds), strict=True):
        assert ref.shape == got.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_context_dependent_attention_is_expanded_and_ops_without_body_are_kept():
    assert has_function_body("Attention", 23) and not has_function_body("Conv", 23)
    model = _model(helper.make_node("Attention", ["q", "k", "v"], ["y"]),
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 3, 4]) for n in "qkv"],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    rng = np.random.default_rng(1)
    feeds = {n: rng.normal(size=(1, 2, 3, 4)).astype(np.float32) for n in "qkv"}
    reference = run_ort(model, feeds)[0]
    result = ExpandFunctionOpsPass(op_types={"Attention", "Conv"})(model)
    counts = op_counts(result.model)
    assert "Attention" not in counts and counts.get("Softmax", 0) == 1
    np.testing.assert_allclose(run_ort(result.model, feeds)[0], reference, rtol=1e-5, atol=1e-6)
