"""The INT8 recipe follows what the graph contains (dlopt.recipe), and the plan follows the recipe."""

from __future__ import annotations

import onnx_ir as ir

import models

from dlopt import recipe
from dlopt.config import CompileConfig
from dlopt.driver import _plan_notes, plan
from dlopt.profiles import resolve_target


def _ir(proto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def test_cnn_keeps_onnxruntime_defaults_and_minmax():
    chosen = recipe.choose(_ir(models.conv_bn_relu()))
    assert (chosen.kind, chosen.op_types, chosen.calib_method, chosen.smooth_alpha) == ("cnn", None, "minmax", None)


def test_transformer_quantises_weight_ops_only_with_percentile_ranges_and_smoothing():
    chosen = recipe.choose(_ir(models.attention_block()))
    assert chosen.kind == "transformer" and chosen.transformer
    assert chosen.op_types == ("Conv", "ConvTranspose", "MatMul", "Gemm")  # Softmax, LayerNorm, Add stay float
    assert chosen.calib_method == "percentile" and chosen.smooth_alpha == 0.5
    assert recipe.choose(_ir(models.attention_block()), "minmax").calib_method == "minmax"  # the user's choice wins
    assert chosen.to_dict()["op_types"] == ["Conv", "ConvTranspose", "MatMul", "Gemm"]


def test_auto_plan_gives_onnxruntime_dynamic_not_static_int8_for_a_transformer():
    model = _ir(models.attention_block())
    config = CompileConfig(model=models.attention_block())
    pairs = plan(config, resolve_target("cpu"), model)
    ort = [p for b, p in pairs if b == "ort"]
    assert "int8-dynamic" in ort and "int8" not in ort
    assert ("openvino", "int8") in pairs  # OpenVINO's INT8 kernels do gain on attention
    assert any(n.startswith("ort: no static int8 for this transformer") for n in _plan_notes(
        type("J", (), {"config": config, "profile": resolve_target("cpu")}), model, pairs))
    # asked for by name, static int8 is built
    assert ("ort", "int8") in plan(CompileConfig(model=models.attention_block(), precision="int8"),
                                   resolve_target("cpu"), model)
    # a CNN keeps static int8 on ONNX Runtime
    assert ("ort", "int8") in plan(CompileConfig(model=models.conv_bn_relu()), resolve_target("cpu"),
                                   _ir(models.conv_bn_relu()))
