import onnx_ir as ir
import pytest

import models
from helpers import assert_same_outputs, op_counts

from dlopt.passes import FoldBatchNormPass, FuseActivationForOrtPass


def test_conv_relu_becomes_fused_conv():
    proto = models.conv_bn_relu()
    model = FoldBatchNormPass()(ir.serde.deserialize_model(proto)).model
    result = FuseActivationForOrtPass()(model)
    assert result.modified
    counts = op_counts(result.model)
    assert counts.get("FusedConv") == 1 and "Relu" not in counts and "Conv" not in counts
    assert_same_outputs(proto, result.model, rel=1e-5)


@pytest.mark.parametrize("activation,attrs", [("Relu", {}), ("Sigmoid", {}), ("Tanh", {}),
                                              ("LeakyRelu", {"alpha": 0.2})])
def test_gemm_activation_becomes_fused_gemm(activation, attrs):
    proto = models.gemm_activation(activation, **attrs)
    result = FuseActivationForOrtPass()(ir.serde.deserialize_model(proto))
    assert op_counts(result.model) == {"FusedGemm": 1}
    assert_same_outputs(proto, result.model, rel=1e-5)


def test_conv_output_used_twice_is_not_fused():
    from onnx import helper

    folded = ir.serde.serialize_model(FoldBatchNormPass()(ir.serde.deserialize_model(models.conv_bn_relu())).model)
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    # the control: as it stands the pair fuses
    assert "FusedConv" in op_counts(FuseActivationForOrtPass()(ir.serde.deserialize_model(folded)).model)
    # expose the conv output as a second graph output: fusing would lose it
    folded.graph.output.append(helper.make_tensor_value_info(conv.output[0], 1, None))
    result = FuseActivationForOrtPass()(ir.serde.deserialize_model(folded))
    assert "FusedConv" not in op_counts(result.model)
    assert op_counts(result.model)["Relu"] == 1
