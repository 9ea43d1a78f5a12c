import json

import models
from cli import dlopt


def test_inspect_json_figures(tmp_path):
    path = models.save(models.conv_bn_relu(channels=8), tmp_path / "m.onnx")
    result = dlopt("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["opset"] == 17 and info["ir_version"] == 8
    assert info["inputs"] == ["x: float32[1,3,16,16]"] and info["outputs"] == ["logits: float32[1,10]"]
    assert info["ops"]["BatchNormalization"] == 1 and info["nodes"] == 7
    # conv 8*3*3*3 + 8, bn 4*8, fc 8*10 + 10
    assert info["parameters"] == 216 + 8 + 32 + 80 + 10
    assert info["size_bytes"] == (tmp_path / "m.onnx").stat().st_size


def test_inspect_table(tmp_path):
    path = models.save(models.conv_bn_relu(), tmp_path / "m.onnx")
    result = dlopt("inspect", path)
    assert result.returncode == 0
    assert "opset 17" in result.stdout and "BatchNormalization" in result.stdout


def test_targets_says_what_builds_here_and_why_not():
    result = dlopt("targets", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"cpu", "x86-avx2", "x86-avx512", "intel-cpu", "arm64", "rpi4", "rpi5", "jetson-orin",
            "jetson-nano", "nvidia-gpu", "cortex-m4", "cortex-m7"} <= set(data)
    assert data["jetson-orin"]["aliases"] == ["jetson"]
    assert "ort" in data["cpu"]["can_build"] and data["cpu"]["runs_here"]
    assert data["rpi5"]["runs_here"] is False
    for reasons in (d["cannot_build"] for d in data.values()):
        assert all(isinstance(r, str) and r for r in reasons.values())


def _weights_in_constants_and_branches():
    """Paddle-style: the MatMul weight is a Constant node; an If's branches hold an initializer and a Constant."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 6), np.float32), "w")
    then_b = helper.make_graph([helper.make_node("Add", ["y", "tb"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 6])],
                               [numpy_helper.from_array(np.ones(6, np.float32), "tb")])
    else_b = helper.make_graph([helper.make_node("Constant", [], ["eb"], value=numpy_helper.from_array(
        np.ones((2, 6), np.float32), "eb_value")), helper.make_node("ReduceSum", ["eb"], ["es"], keepdims=0),
        helper.make_node("Add", ["y", "es"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 6])])
    nodes = [helper.make_node("Constant", [], ["w_c"], value=w),
             helper.make_node("Constant", [], ["k"], value_floats=[1.0, 2.0, 3.0]),
             helper.make_node("MatMul", ["x", "w_c"], ["y"]),
             helper.make_node("If", ["flag"], ["out"], then_branch=then_b, else_branch=else_b)]
    return models._model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                 helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                         [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 6])], [])


def test_inspect_counts_weights_in_constant_nodes_and_subgraphs(tmp_path):
    path = models.save(_weights_in_constants_and_branches(), tmp_path / "m.onnx")
    result = dlopt("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    # Constant w 4*6, Constant value_floats 3, then-branch initializer 6, else-branch Constant 2*6
    assert json.loads(result.stdout)["parameters"] == 24 + 3 + 6 + 12


def test_inspect_target_asks_the_backend_after_the_generic_passes(tmp_path):
    # a compile folds BatchNormalization into the Conv before asking the C backend what it lacks
    path = models.save(models.conv_bn_relu(channels=8), tmp_path / "m.onnx")
    before = (tmp_path / "m.onnx").read_bytes()
    result = dlopt("inspect", path, "--target", "cortex-m7", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["ops"]["BatchNormalization"] == 1  # the histogram is the model as given
    entry = info["backends"]["c"]
    assert entry["available"] and "BatchNormalization" not in entry["unsupported"]
    assert entry["unsupported"] == [] and "note" not in entry
    assert (tmp_path / "m.onnx").read_bytes() == before


def test_backend_support_leaves_the_proto_unchanged():
    from dlopt.core.profiles import resolve_target
    from dlopt.report.summary import backend_support

    proto = models.conv_bn_relu(channels=8)
    before = proto.SerializeToString()
    assert backend_support(proto, resolve_target("cortex-m7"))["c"]["unsupported"] == []
    assert proto.SerializeToString() == before
