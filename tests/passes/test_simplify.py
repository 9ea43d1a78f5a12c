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
