import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

import models
from helpers import assert_same_outputs, op_counts

from dlopt.passes import FoldBatchNormPass


def test_batchnorm_folded_into_conv_keeps_outputs():
    proto = models.conv_bn_relu()
    result = FoldBatchNormPass()(ir.serde.deserialize_model(proto))
    assert result.modified
    counts = op_counts(result.model)
    assert "BatchNormalization" not in counts
    assert counts["Conv"] == 1
    assert_same_outputs(proto, result.model, rel=1e-5)


def test_batchnorm_after_non_constant_weights_stays():
    proto = models.conv_bn_relu()
    # make the conv weight a graph input: folding would need to rewrite data it does not own
    proto.graph.input.append(helper.make_tensor_value_info("w", 1, [8, 3, 3, 3]))
    w = [i for i in proto.graph.initializer if i.name == "w"][0]
    proto.graph.initializer.remove(w)
    pass_ = FoldBatchNormPass()
    result = pass_(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert op_counts(result.model)["BatchNormalization"] == 1
    assert pass_.unfolded == [("bn", "weight 'w' is not a constant initializer")]


def test_note_counts_rewrites():
    pass_ = FoldBatchNormPass()
    pass_(ir.serde.deserialize_model(models.conv_bn_relu()))
    assert pass_.note == "1 rewrite(s)" and pass_.unfolded == []


def _bn_params(rng, prefix: str, c: int) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(a.astype(np.float32), f"{prefix}_{n}") for n, a in (
        ("scale", rng.uniform(0.5, 2.0, c)), ("b", rng.standard_normal(c)),
        ("mean", rng.standard_normal(c)), ("var", rng.uniform(0.3, 3.0, c)))]


def _bn(prefix: str, x: str, eps: float = 1e-3) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{n}" for n in ("scale", "b", "mean", "var")],
                            [f"{prefix}_out"], epsilon=eps, name=prefix)


def shared_params_model(seed: int = 0) -> onnx.ModelProto:
    """ResNet-style pairs: a stride-2 conv and a 1x1 shortcut sharing one bias; two convs sharing a weight.

    Also a bias-free conv, a ConvTranspose whose bias is shared with a Conv, and a Gemm: every
    BatchNormalization here can be folded.
    """
    rng = np.random.default_rng(seed)
    c = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32) * 0.3, "w3"),
        numpy_helper.from_array(rng.standard_normal((c, 3, 1, 1)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32) * 0.1, "shared_b"),
        numpy_helper.from_array(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.2, "shared_w"),
        numpy_helper.from_array(rng.standard_normal((c, c, 1, 1)).astype(np.float32) * 0.2, "nobias_w"),
        numpy_helper.from_array(rng.standard_normal((c, c // 2, 2, 2)).astype(np.float32) * 0.2, "tw"),
        numpy_helper.from_array(rng.standard_normal((c, 5)).astype(np.float32) * 0.3, "fc_w"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32) * 0.1, "fc_b"),
    ]
    for prefix, channels in (("bn_a", c), ("bn_b", c), ("bn_c", c), ("bn_d", c), ("bn_e", c), ("bn_t", c),
                             ("bn_g", 5)):
        inits += _bn_params(rng, prefix, channels)
    nodes = [
        # one stage: stride-2 3x3 conv and stride-2 1x1 shortcut, one bias initializer for both
        helper.make_node("Conv", ["x", "w3", "shared_b"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv_a"),
        helper.make_node("Conv", ["x", "w1", "shared_b"], ["b"], strides=[2, 2], name="conv_b"),
        _bn("bn_a", "a"), _bn("bn_b", "b"),
        helper.make_node("Add", ["bn_a_out", "bn_b_out"], ["s"], name="add"),
        # two convs with one weight (and no bias)
        helper.make_node("Conv", ["s", "shared_w"], ["c"], pads=[1, 1, 1, 1], name="conv_c"),
        helper.make_node("Conv", ["s", "shared_w"], ["d"], pads=[1, 1, 1, 1], name="conv_d"),
        _bn("bn_c", "c"), _bn("bn_d", "d"),
        helper.make_node("Add", ["bn_c_out", "bn_d_out"], ["cd"], name="add2"),
        helper.make_node("Conv", ["cd", "nobias_w"], ["e"], name="conv_e"),
        _bn("bn_e", "e"),
        # a grouped ConvTranspose that shares the stage's bias
        helper.make_node("ConvTranspose", ["bn_e_out", "tw", "shared_b"], ["t"], strides=[2, 2], group=2,
                         name="deconv"),
        _bn("bn_t", "t"),
        helper.make_node("GlobalAveragePool", ["bn_t_out"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["g"], beta=0.5, name="fc"),
        _bn("bn_g", "g"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])
    y = helper.make_tensor_value_info("bn_g_out", TensorProto.FLOAT, [2, 5])
    t = helper.make_tensor_value_info("bn_t_out", TensorProto.FLOAT, [2, c, 16, 16])
    return models._model(nodes, [x], [y, t], inits, name="shared_params")


def test_batchnorm_folded_after_convs_sharing_bias_and_weight():
    proto = shared_params_model()
    pass_ = FoldBatchNormPass()
    result = pass_(ir.serde.deserialize_model(proto))
    folded = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(folded, full_check=True)
    counts = op_counts(folded)
    assert "BatchNormalization" not in counts
    assert (counts["Conv"], counts["ConvTranspose"], counts["Gemm"]) == (5, 1, 1)
    assert pass_.note == "7 rewrite(s)" and pass_.unfolded == []
    # every folded node has weights and bias of its own; the shared originals are gone, nothing dangles
    by_name = {n.name: n for n in folded.graph.node}
    params = [tuple(by_name[n].input[1:]) for n in ("conv_a", "conv_b", "conv_c", "conv_d", "conv_e", "deconv", "fc")]
    assert all(len(p) == 2 for p in params) and len({v for p in params for v in p}) == 14
    names = {i.name for i in folded.graph.initializer}
    assert {v for p in params for v in p} == names  # BN params and the shared originals removed
    assert_same_outputs(proto, folded, rel=1e-5)


def test_shared_weight_still_used_elsewhere_is_kept():
    proto = shared_params_model()
    # a third conv reads shared_w with no BatchNorm after it: the original must stay for it
    proto.graph.node.append(helper.make_node("Conv", ["s", "shared_w"], ["extra"], pads=[1, 1, 1, 1], name="conv_x"))
    proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [2, 8, 8, 8]))
    result = FoldBatchNormPass()(ir.serde.deserialize_model(proto))
    folded = ir.serde.serialize_model(result.model)
    assert "BatchNormalization" not in op_counts(folded)
    assert next(n for n in folded.graph.node if n.name == "conv_x").input[1] == "shared_w"
    assert "shared_w" in {i.name for i in folded.graph.initializer}
    assert_same_outputs(proto, folded, rel=1e-5)


def test_what_cannot_be_folded_is_reported_with_its_reason():
    proto = shared_params_model()
    # bn_a's scale becomes a graph input; bn_c reads the Add, not a conv; conv_e's output also feeds an output
    proto.graph.initializer.remove(next(i for i in proto.graph.initializer if i.name == "bn_a_scale"))
    proto.graph.input.append(helper.make_tensor_value_info("bn_a_scale", TensorProto.FLOAT, [8]))
    next(n for n in proto.graph.node if n.name == "bn_c").input[0] = "s"
    proto.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 8, 8, 8]))
    pass_ = FoldBatchNormPass()
    result = pass_(ir.serde.deserialize_model(proto))
    assert dict(pass_.unfolded) == {
        "bn_a": "scale 'bn_a_scale' is not a constant initializer",
        "bn_c": "its input comes from Add 'add', not Conv/ConvTranspose/Gemm",
        "bn_e": "the Conv output 'e' is also used elsewhere",
    }
    assert pass_.note.startswith("4 rewrite(s); 3 BatchNormalization(s) not folded: bn_a: scale 'bn_a_scale'")
    assert op_counts(result.model)["BatchNormalization"] == 3
    feeds = {"bn_a_scale": np.linspace(0.5, 1.5, 8).astype(np.float32)}
    from helpers import max_rel_error, random_feed, run_ort

    feed = {**random_feed(proto), **feeds}
    for ref, got in zip(run_ort(proto, feed), run_ort(result.model, feed), strict=True):
        assert max_rel_error(ref, got) <= 1e-5


def test_conv_feeding_two_batchnorms_is_copied_so_both_fold():
    proto = shared_params_model()
    # what onnxsim makes of conv_c and conv_d (same input, same weight): one Conv feeding both BatchNorms
    next(n for n in proto.graph.node if n.name == "bn_d").input[0] = "c"
    proto.graph.node.remove(next(n for n in proto.graph.node if n.name == "conv_d"))
    pass_ = FoldBatchNormPass()
    result = pass_(ir.serde.deserialize_model(proto))
    counts = op_counts(result.model)
    assert "BatchNormalization" not in counts and counts["Conv"] == 5
    assert pass_.note == "7 rewrite(s) (1 producer(s) copied: their output fed several BatchNorms)"
    assert_same_outputs(proto, result.model, rel=1e-5)


def test_generic_pipeline_folds_every_batchnorm_of_the_shared_params_model():
    from dlopt.passes import generic_passes
    from dlopt.core.pipeline import run_pipeline

    proto = shared_params_model()
    model = ir.serde.deserialize_model(proto)
    result = run_pipeline(model, generic_passes(model=model))
    record = next(r for r in result.records if r.name == "FoldBatchNormPass")
    assert (record.ops_before["BatchNormalization"], record.ops_after.get("BatchNormalization", 0)) == (7, 0)
    assert_same_outputs(proto, result.model, rel=1e-5)
