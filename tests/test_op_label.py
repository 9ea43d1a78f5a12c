"""One way to name an operator (dlopt.core.graph_facts.op_label): op histograms, pass records and backends'
unsupported-op lists all say ``Relu`` for the default domain and ``my.ops.Frob`` for any other."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from dlopt.core.graph_facts import op_label
from dlopt.core.pipeline import op_histogram
from dlopt.report.summary import summarize
from dlopt.targets.c import backend as c
from dlopt.targets import ort, tensorrt


def _custom() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Frob", ["r"], ["f"], domain="my.ops"),
             helper.make_node("Relu", ["f"], ["y"], domain="ai.onnx")]
    graph = helper.make_graph(nodes, "custom", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])


def test_every_reader_names_default_and_custom_domain_ops_alike():
    proto = _custom()
    model = ir.serde.deserialize_model(proto)
    assert [op_label(n) for n in proto.graph.node] == [op_label(n) for n in model.graph] == ["Relu", "my.ops.Frob",
                                                                                             "Relu"]
    assert op_histogram(model) == summarize(proto)["ops"] == {"Relu": 2, "my.ops.Frob": 1}
    supported = [ort.BACKEND.supports(model), tensorrt.BACKEND.supports(model), c.BACKEND.supports(model)]
    assert supported == [["my.ops.Frob"]] * 3
