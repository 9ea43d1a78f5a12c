"""A token encoder whose padding positions hold what real encoders leave there: values the
model's own mask hides downstream.  ``input_ids``/``attention_mask`` [batch, seq] ->
``last_hidden_state`` [batch, seq, 32]; the pad token's embedding row is a hundred times
smaller than the others, so INT8 (ranges set by the real tokens) turns padding to noise."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, WIDTH = 50, 32


def token_encoder(path, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
    table[0] *= 0.01  # the pad token
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(WIDTH, np.float32), "b"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("MatMul", ["emb", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["lin"]),
        # the mask reaches the output only through a zero-weighted term, as padding does in a real encoder
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
        helper.make_node("Mul", ["mask3", "b"], ["zero"]),
        helper.make_node("Add", ["lin", "zero"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def padded_tokens(count: int, seq: int, *, seed: int = 1):
    """Sentences of 3 to seq//3 tokens, padded with token 0 to ``seq``: mostly padding, as in real batches."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((count, seq), np.int64)
    mask = np.zeros((count, seq), np.int64)
    for i in range(count):
        length = int(rng.integers(3, max(seq // 3, 4)))
        ids[i, :length] = rng.integers(1, VOCAB, length)
        mask[i, :length] = 1
    return ids, mask
