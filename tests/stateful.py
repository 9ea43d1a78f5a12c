"""A voice-activity-detector-shaped model: audio [batch, 64], a state [2, batch, 16] it returns
updated, and a scalar sample rate ``sr`` whose If sends any rate but 16000 down a branch that
cannot run (a Gather past the end), as real VAD exports do."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def stateful_vad(path, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32) * 0.2, "w1")
    far = numpy_helper.from_array(np.array([100], np.int64), "far")  # past the 64 samples: fails at run time
    eight = numpy_helper.from_array(np.array([1, 8], np.int64), "eight")
    w3 = numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "w3")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["feat_t"])], "then", [],
                               [helper.make_tensor_value_info("feat_t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Gather", ["x", "far"], ["picked"], axis=1),
                                helper.make_node("Expand", ["picked", "eight"], ["feat_e"])], "else", [],
                               [helper.make_tensor_value_info("feat_e", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["feat"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Relu", ["feat"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["h"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["state", "half"], ["decayed"]),
        helper.make_node("Add", ["decayed", "h"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["stateN"]),
        helper.make_node("MatMul", ["act", "w3"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 16]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 16])],
        [w1, far, eight, w3, half, rate])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path
