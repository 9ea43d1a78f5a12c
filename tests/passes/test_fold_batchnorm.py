import onnx_ir as ir
from onnx import helper

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
    result = FoldBatchNormPass()(ir.serde.deserialize_model(proto))
    assert not result.modified
    assert op_counts(result.model)["BatchNormalization"] == 1


def test_note_counts_rewrites():
    pass_ = FoldBatchNormPass()
    pass_(ir.serde.deserialize_model(models.conv_bn_relu()))
    assert pass_.note == "1 rewrite(s)"
