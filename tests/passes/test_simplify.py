import onnx_ir as ir

import models
from helpers import assert_same_outputs, op_counts

from dlopt.passes import SimplifyPass


def test_constants_folded_and_identity_removed():
    proto = models.foldable_constants()
    assert op_counts(proto) == {"Add": 2, "Mul": 1, "Identity": 1}
    result = SimplifyPass()(ir.serde.deserialize_model(proto))
    assert result.modified
    assert op_counts(result.model) == {"Mul": 1, "Add": 1}
    assert_same_outputs(proto, result.model, rel=1e-6)


def test_batchnorm_left_for_its_own_pass_by_default():
    proto = models.conv_bn_relu()
    result = SimplifyPass()(ir.serde.deserialize_model(proto))
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert_same_outputs(proto, result.model, rel=1e-6)


def test_input_model_is_not_changed():
    model = ir.serde.deserialize_model(models.foldable_constants())
    result = SimplifyPass()(model)
    assert result.model is not model
    assert len(list(model.graph)) == 4


def test_batched_matmul_add_is_not_rewritten_to_reshaped_gemm():
    # onnxsim would turn x[N,S,D] @ W + b into Reshape -> Gemm -> Reshape (plus Shape/Slice):
    # slower on ONNX Runtime for transformers
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = SimplifyPass()(model)
    counts = op_counts(result.model)
    assert counts.get("MatMul") == 1 and "Gemm" not in counts and "Reshape" not in counts
    assert_same_outputs(model, result.model)
