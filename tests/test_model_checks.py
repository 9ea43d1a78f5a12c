"""Models dlopt cannot feed or compare are refused up front: one line on stderr, exit code 2."""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto, helper

import dlopt
import models
from cli import dlopt as run_cli
from dlopt.core.errors import ModelError


def _graph_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "checks", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)], ir_version=8)


def _zero_dim():
    model = models.conv_bn_relu()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0
    return model


def _no_inputs():
    value = helper.make_tensor("v", TensorProto.FLOAT, [2], [1.0, 2.0])
    return _graph_model([helper.make_node("Constant", [], ["y"], value=value)], [],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])


def _no_outputs():
    return _graph_model([helper.make_node("Relu", ["x"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [])


def _sequence_output():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    return _graph_model([helper.make_node("SequenceConstruct", ["x", "x"], ["s"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [seq])


def _sequence_input():
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    return _graph_model([helper.make_node("ConcatFromSequence", ["s"], ["y"], axis=0)], [seq],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])


def _optional_output():
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, [2])))
    return _graph_model([helper.make_node("Optional", ["x"], ["o"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [opt])


def _map_input():
    mapping = helper.make_value_info("m", helper.make_map_type_proto(
        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    model = _graph_model([helper.make_node("Identity", ["x"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]), mapping],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return model


CASES = [
    (_zero_dim, "input 'x' has a zero-size dimension (shape [1, 3, 0, 16]); dlopt cannot feed an empty tensor"),
    (_no_inputs, "has no inputs; dlopt optimises models that take at least one input tensor"),
    (_no_outputs, "has no outputs; a model must return at least one tensor"),
    (_sequence_output, "output 's' is a sequence; dlopt handles tensor inputs and outputs only"),
    (_sequence_input, "input 's' is a sequence; dlopt handles tensor inputs and outputs only"),
    (_optional_output, "output 'o' is an optional; dlopt handles tensor inputs and outputs only"),
    (_map_input, "input 'm' is a map; dlopt handles tensor inputs and outputs only"),
]
IDS = [make.__name__.strip("_") for make, _ in CASES]


def _assert_one_line_error(result, message, folder, before):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dlopt: error: ")
    assert message in lines[0]
    assert result.stdout == ""
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


@pytest.mark.parametrize("make,message", CASES, ids=IDS)
def test_cli_refuses_model(tmp_path, make, message):
    path = tmp_path / "m.onnx"
    path.write_bytes(make().SerializeToString())
    result = run_cli("compile", path, "--precision", "fp32", "-o", tmp_path / "out", cwd=tmp_path)
    _assert_one_line_error(result, message, tmp_path, ["m.onnx"])
    assert str(path) in result.stderr


@pytest.mark.parametrize("make,message", CASES, ids=IDS)
def test_api_refuses_in_memory_model(tmp_path, make, message):
    with pytest.raises(ModelError) as info:
        dlopt.compile(make(), out=tmp_path / "out", precision="fp32")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_symbolic_and_positive_dims_are_fine(tmp_path):
    path = models.save(models.conv_bn_relu(batch="N"), tmp_path / "m.onnx")
    result = run_cli("inspect", path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_fifo_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    # Opening a FIFO with no writer blocks: the timeout turns such a hang into a failure.
    result = run_cli("compile", fifo, "-o", tmp_path / "out", cwd=tmp_path, timeout=120)
    _assert_one_line_error(result, f"{fifo} is not a regular file (a pipe); give an .onnx file", tmp_path,
                           ["pipe.onnx"])


def test_inspect_refuses_fifo_too(tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    result = run_cli("inspect", fifo, cwd=tmp_path, timeout=120)
    _assert_one_line_error(result, "is not a regular file (a pipe)", tmp_path, ["pipe.onnx"])
