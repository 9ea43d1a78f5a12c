"""Random inputs that real models can run (dlopt.core.inputs)."""

import numpy as np
from onnx import TensorProto, helper

from dlopt.core.specs import input_specs
from dlopt.core.inputs import RandomInputs, index_limits


def bert_like(vocab=30, types=2, hidden=8, seq="seq"):
    """Embeddings of input_ids + token_type_ids, masked mean: enough of BERT to crash on 0-9 type ids."""
    rng = np.random.default_rng(0)
    words = helper.make_tensor("words", TensorProto.FLOAT, [vocab, hidden], rng.standard_normal(vocab * hidden))
    kinds = helper.make_tensor("kinds", TensorProto.FLOAT, [types, hidden], rng.standard_normal(types * hidden))
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["kinds", "token_type_ids"], ["k"]),
        helper.make_node("Add", ["w", "k"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["hidden_states"]),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", seq])
            for n in ("input_ids", "token_type_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "bert", ints,
                              [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT,
                                                             ["batch", seq, hidden])],
                              [words, kinds, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_indices_stay_inside_their_tables_and_masks_are_ones():
    model = bert_like()
    assert index_limits(model) == {"input_ids": 30, "token_type_ids": 2}
    random = RandomInputs.for_model(model, input_specs(model))
    feeds = random.feeds({"input_ids": (4, 16), "token_type_ids": (4, 16), "attention_mask": (4, 16)}, 5, seed=0)
    types = np.concatenate([f["token_type_ids"] for f in feeds])
    ids = np.concatenate([f["input_ids"] for f in feeds])
    assert set(np.unique(types)) == {0, 1} and ids.max() < 30 and ids.max() >= 10
    assert all((f["attention_mask"] == 1).all() for f in feeds)
