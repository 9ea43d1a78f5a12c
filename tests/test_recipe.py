"""The INT8 recipe follows what the graph contains (dlopt.recipe), and the plan follows the recipe."""

from __future__ import annotations

import onnx_ir as ir

import models

from dlopt import recipe
from dlopt.config import CompileConfig
from dlopt.driver import plan
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


def test_auto_plan_tries_onnxruntime_dynamic_before_static_int8_for_a_transformer():
    model = _ir(models.attention_block())
    pairs = plan(CompileConfig(model=models.attention_block()), resolve_target("cpu"), model)
    ort = [p for b, p in pairs if b == "ort"]
    assert ort.index("int8-dynamic") == ort.index("int8") - 1  # dynamic first: static only if it misses
    assert ("openvino", "int8") in pairs  # OpenVINO's INT8 kernels do gain on attention
    # a CNN keeps the usual order (static int8, then nothing dynamic)
    cnn = [p for b, p in plan(CompileConfig(model=models.conv_bn_relu()), resolve_target("cpu"),
                              _ir(models.conv_bn_relu())) if b == "ort"]
    assert cnn[:3] == ["fp32", "fp16", "int8"] and "int8-dynamic" not in cnn


def test_static_int8_is_skipped_when_dynamic_meets_the_budget(tmp_path):
    import numpy as np

    import dlopt

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((16, 8, 32)).astype(np.float32))
    report = dlopt.compile(models.save(models.attention_block(), tmp_path / "block.onnx"), target="cpu",
                           inputs=tmp_path / "eval.npz", out=tmp_path / "out", max_accuracy_drop=5, runs=20,
                           cache=False)
    keys = {c.key: c for c in report.candidates}
    assert keys["ort/int8-dynamic"].status == "ok" and keys["ort/int8-dynamic"].score["drop_pp"] <= 5
    assert "ort/int8" not in keys  # not built
    assert any(n.startswith("ort: no static int8 for this transformer: int8-dynamic met the budget")
               for n in report.notes)
    assert keys["openvino/int8"].quantiser.startswith("nncf ")
    assert report.calibration["recipe"]["kind"] == "transformer"
