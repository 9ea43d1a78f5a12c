"""FoldShapeArithmeticPass folds a mask built from the input's shape once the input shape is fixed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from helpers import op_counts, run_ort

from dlopt.passes.fix_input_shapes import FixInputShapesPass
from dlopt.passes.fold_shape_arithmetic import FoldShapeArithmeticPass


def _masked() -> ir.Model:
    """y = x * Cast(And(ConstantOfShape([]), Range(0, x.shape[1]) >= 1)), as transformers' mask helpers
    export; ``r`` carries the exporter's stale symbolic shape, as real exports' value_info does."""
    scalar = numpy_helper.from_array
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "one"], ["seq"]),
         helper.make_node("Range", ["zero", "seq", "one"], ["r"]),
         helper.make_node("GreaterOrEqual", ["r", "one"], ["ge"]),
         helper.make_node("ConstantOfShape", ["empty"], ["true"],
                          value=helper.make_tensor("v", TensorProto.BOOL, [1], [True])),
         helper.make_node("And", ["true", "ge"], ["m"]),
         helper.make_node("Cast", ["m"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "mf"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
        [scalar(np.array(0, np.int64), "zero"), scalar(np.array(1, np.int64), "one"),
         scalar(np.zeros(0, np.int64), "empty")],
        value_info=[helper.make_tensor_value_info("r", TensorProto.INT64, ["unk__0"])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_fixed_shapes_fold_the_mask_to_a_constant():
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    model = FixInputShapesPass(shapes={"x": x.shape})(_masked()).model
    result = FoldShapeArithmeticPass()(model)
    assert result.modified and op_counts(result.model) == {"Mul": 1}
    (mask,) = [v for v in result.model.graph.initializers.values() if v.name != "y"]
    assert mask.const_value.numpy().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert list(result.model.graph.outputs[0].shape) == [2, 4]
    np.testing.assert_array_equal(run_ort(result.model, {"x": x})[0], run_ort(_masked(), {"x": x})[0])


def test_symbolic_shapes_and_large_fills_stay():
    unfixed = FoldShapeArithmeticPass()(_masked()).model  # only the constant fill folds
    assert op_counts(unfixed) == {"Shape": 1, "Gather": 1, "Range": 1, "GreaterOrEqual": 1, "And": 1, "Cast": 1,
                                  "Mul": 1}
    model = FixInputShapesPass(shapes={"x": (2, 4)})(_masked()).model
    kept = FoldShapeArithmeticPass(fill_limit=0)(model).model  # the 1-byte fill is over the limit
    assert op_counts(kept) == {"ConstantOfShape": 1, "And": 1, "Cast": 1, "Mul": 1}
