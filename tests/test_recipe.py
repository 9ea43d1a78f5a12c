"""The INT8 recipe follows what the graph contains (dlopt.flow.recipe), and the plan follows the recipe."""

from __future__ import annotations

import onnx_ir as ir

import models

from dlopt.flow import recipe
from dlopt.core.config import CompileConfig
from dlopt.flow.driver import plan
from dlopt.core.profiles import resolve_target


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
    pairs = plan(CompileConfig.build(models.attention_block()), resolve_target("cpu"), model)
    ort = [p for b, p in pairs if b == "ort"]
    assert ort.index("int8-dynamic") == ort.index("int8") - 1  # dynamic first: static only if it misses
    assert ("openvino", "int8") in pairs  # OpenVINO's INT8 kernels do gain on attention
    # a CNN keeps the usual order (static int8, then nothing dynamic)
    cnn = [p for b, p in plan(CompileConfig.build(models.conv_bn_relu()), resolve_target("cpu"),
                              _ir(models.conv_bn_relu())) if b == "ort"]
    assert cnn[:3] == ["fp32", "fp16", "int8"] and "int8-dynamic" not in cnn


def test_static_int8_is_skipped_when_dynamic_meets_the_budget(tmp_path):
    import numpy as np

    import dlopt

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((16, 8, 32)).astype(np.float32))
    # the two backends whose int8 the recipe decides (ONNX Runtime's order, OpenVINO's NNCF); timing decides nothing
    (tmp_path / "t.toml").write_text('[targets.here]\nbase = "cpu"\nbackends = ["ort", "openvino"]\n')
    report = dlopt.compile(models.save(models.attention_block(), tmp_path / "block.onnx"), target="here",
                           targets_file=tmp_path / "t.toml", inputs=tmp_path / "eval.npz", out=tmp_path / "out",
                           max_accuracy_drop=5, runs=5, warmup=1, cache=False)
    keys = {c.key: c for c in report.candidates}
    assert keys["ort/int8-dynamic"].status == "ok" and keys["ort/int8-dynamic"].score.drop_pp <= 5
    assert "ort/int8" not in keys  # not built
    assert any(n.startswith("ort: no static int8 for this transformer: int8-dynamic met the budget")
               for n in report.notes)
    assert keys["openvino/int8"].quantiser.startswith("nncf ")
    assert report.calibration["recipe"]["kind"] == "transformer"


def _with_softmax_head(proto):
    """``proto`` with its logits renamed and a Softmax producing the output under the old name."""
    from onnx import helper

    out = proto.graph.output[0].name
    producer = next(n for n in proto.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = out + "_raw"
    proto.graph.node.append(helper.make_node("Softmax", [out + "_raw"], [out], axis=-1, name="head_softmax"))
    return proto


def test_cnn_whose_only_softmax_is_its_classifier_head_keeps_the_cnn_recipe():
    proto = _with_softmax_head(models.conv_bn_relu())
    model = _ir(proto)
    assert [n.op_type for n in model.graph].count("Softmax") == 1
    assert not recipe.has_attention(model)
    chosen = recipe.choose(model)
    assert (chosen.kind, chosen.op_types, chosen.calib_method) == ("cnn", None, "minmax")


def test_softmax_reaching_a_matmul_through_pass_through_ops_is_attention():
    from onnx import TensorProto, helper

    proto = models.attention_block()
    pv = next(n for n in proto.graph.node if n.name == "pv")
    # Softmax -> Cast -> Dropout -> Transpose -> Transpose -> MatMul, as some exporters write it
    pv.input[0] = "p_t2"
    proto.graph.node.extend([
        helper.make_node("Cast", ["p"], ["p_c"], to=TensorProto.FLOAT, name="p_cast"),
        helper.make_node("Dropout", ["p_c"], ["p_d"], name="p_dropout"),
        helper.make_node("Transpose", ["p_d"], ["p_t1"], perm=[0, 2, 1], name="p_t1"),
        helper.make_node("Transpose", ["p_t1"], ["p_t2"], perm=[0, 2, 1], name="p_t2"),
    ])
    model = _ir(proto)
    assert recipe.has_attention(model)
    assert recipe.choose(model).kind == "transformer"
    # the same block with the Softmax's path to the MatMul cut (its output feeds only an Add) is no attention
    pv.input[0] = "n"
    assert not recipe.has_attention(_ir(proto))
