import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from helpers import assert_same_outputs, op_counts

from dlopt.passes import MatMulAddToGemmPass


def _matmul_add(rank: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    shape = [3, 6] if rank == 2 else [2, 3, 6]
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["y"])]
    graph = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:-1] + [4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_rank2_matmul_add_becomes_gemm():
    proto = _matmul_add(2)
    result = MatMulAddToGemmPass()(ir.serde.deserialize_model(proto))
    assert result.modified
    assert op_counts(result.model) == {"Gemm": 1}
    assert_same_outputs(proto, result.model, rel=1e-6)


def test_batched_matmul_is_left_alone():
    proto = _matmul_add(3)
    result = MatMulAddToGemmPass()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert op_counts(result.model) == {"MatMul": 1, "Add": 1}
