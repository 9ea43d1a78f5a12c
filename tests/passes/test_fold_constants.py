"""A bias-free Conv as torch exports it: the generic passes fold its zero bias and its BatchNorm."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from helpers import assert_same_outputs, op_counts

from dlopt.passes import FoldConstantsPass, generic_passes
from dlopt.core.pipeline import run_pipeline
from dlopt.targets import ort

torch = pytest.importorskip("torch", reason="torch is needed to export a real module")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import dlopt

    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                 torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    path = dlopt.export(module, torch.randn(1, 3, 8, 8), tmp_path_factory.mktemp("bias") / "m.onnx")
    return ir.load(str(path))


def test_exporter_writes_a_computed_zero_bias(exported):
    counts = op_counts(exported)
    assert counts["CastLike"] == 1 and counts["BatchNormalization"] == 1


def test_fold_constants_removes_the_bias_chain(exported):
    model = exported.clone()
    result = FoldConstantsPass()(model)
    assert result.modified and "CastLike" not in op_counts(result.model)
    assert_same_outputs(exported, result.model, rel=1e-6)


def test_generic_pipeline_folds_batchnorm_and_leaves_ort_nothing_unsupported(exported):
    result = run_pipeline(exported.clone(), generic_passes())
    counts = op_counts(result.model)
    assert "BatchNormalization" not in counts and "CastLike" not in counts and "Constant" not in counts
    assert counts["Conv"] == 1
    assert ort.BACKEND.supports(result.model) == []
    assert_same_outputs(exported, result.model, rel=1e-5)


def test_castlike_without_saturation_keeps_it_when_folded_into_a_cast():
    """onnxscript's folder rewrites CastLike as Cast; `saturate=0` must survive, or 500.0 -> float8e4m3fn
    becomes 448 (saturated) where the model asks for NaN (the onnx backend case cast_no_saturate)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    like = helper.make_tensor("like", TensorProto.FLOAT8E4M3FN, [1], [0.0])
    graph = helper.make_graph([helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [3])], [like])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model = ir.serde.deserialize_model(proto)
    FoldConstantsPass()(model)
    (node,) = list(model.graph)
    assert node.op_type == "Cast" and node.attributes["saturate"].value == 0
    x = np.array([1.0, 500.0, -1000.0], np.float32)
    folded = ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"x": x})[0]
    original = ReferenceEvaluator(proto).run(None, {"x": x})[0]
    assert np.array_equal(folded.view(np.uint8), original.view(np.uint8))
    onnx.checker.check_model(ir.serde.serialize_model(model))
