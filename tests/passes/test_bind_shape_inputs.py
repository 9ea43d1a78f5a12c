"""BindShapeInputsPass binds only inputs used as shapes or axes; FixInputShapesPass fixes symbolic dims."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from helpers import op_counts, run_ort

from dlopt.passes import FoldConstantsPass
from dlopt.passes.bind_shape_inputs import BindShapeInputsPass, shape_inputs
from dlopt.passes.fix_input_shapes import FixInputShapesPass


def _reduce_reshape() -> ir.Model:
    """y = Reshape(ReduceSum(x, axes), shape); axes and shape are run-time inputs, x is data."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
         helper.make_node("Reshape", ["s", "shape"], ["y"]),
         helper.make_node("Add", ["x", "x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("axes", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


FEEDS = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "axes": np.array([1], np.int64),
         "shape": np.array([-1], np.int64)}


def test_only_shape_operands_are_bound_and_outputs_are_unchanged():
    model = _reduce_reshape()
    assert shape_inputs(model) == ["axes", "shape"]
    reference = run_ort(model, FEEDS)
    bind = BindShapeInputsPass(values=FEEDS)
    result = bind(model.clone())
    assert result.modified and bind.bound == ["axes", "shape"]
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    assert sorted(result.model.graph.initializers) == ["axes", "shape"]
    got = run_ort(result.model, {"x": FEEDS["x"]})
    np.testing.assert_array_equal(got[0], [6.0, 22.0, 38.0])
    for ref, out in zip(reference, got, strict=True):
        np.testing.assert_array_equal(ref, out)


def test_a_value_of_another_dtype_is_refused():
    with pytest.raises(ValueError, match="'axes' is int64"):
        BindShapeInputsPass(values={"axes": np.array([1], np.int32)})(_reduce_reshape())


def test_fixed_shapes_let_shape_computations_fold():
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    fixed = FixInputShapesPass(shapes={"x": (2, 3)})(model).model
    assert fixed.graph.inputs[0].shape == ir.Shape([2, 3])
    folded = FoldConstantsPass()(fixed).model
    assert "Shape" not in op_counts(folded)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(run_ort(folded, {"x": x})[0], x)


def test_a_fixed_dimension_that_disagrees_is_refused():
    with pytest.raises(ValueError, match="'x' has shape"):
        FixInputShapesPass(shapes={"x": (5, 5)})(_reduce_reshape())
