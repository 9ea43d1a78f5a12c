"""ExpandFunctionOpsPass: replace ONNX ops by the function body their schema defines.

Many recent ONNX ops (Attention, LayerNormalization, RotaryEmbedding,
NegativeLogLikelihoodLoss, Swish, ...) are defined by a function of older, common
ops.  A backend that has no converter for one (or a wrong one) can still run the
model once the op is written out as that body: this is how the ONNX backend tests
build their ``*_expanded`` models.

Guarantees:

* Only main-graph nodes of the ONNX domain whose type is in ``op_types`` and whose
  schema, at the model's opset, has a function body (plain or context-dependent) are
  replaced; a body that itself holds subgraphs, or needs input types the model does
  not state, is left alone and named in ``kept``.
* The replacement computes the op's outputs under the same names; internal values get
  fresh names; attributes the node leaves unset take the schema's defaults.
* ``expanded`` counts the nodes replaced per op type.
"""

from __future__ import annotations

import collections
import itertools
from typing import Iterable

import onnx
import onnx_ir as ir


def has_function_body(op_type: str, opset: int) -> bool:
    """Whether ONNX defines ``op_type`` (at ``opset``) by a function body."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return bool(schema.has_function or schema.has_context_dependent_function)


def _function(schema, node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    plain = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    if plain and (not dependent or max(plain) >= max(dependent)):
        data = schema.get_function_with_opset_version(max(plain))
    elif dependent:
        if any(name and name not in types for name in node.input):
            return None
        data = schema.get_context_dependent_function_with_opset_version(
            max(dependent), node.SerializeToString(),
            [types[n].SerializeToString() if n else onnx.TypeProto().SerializeToString() for n in node.input])
    else:
        return None
    function = onnx.FunctionProto()
    function.ParseFromString(data)
    return function


def _body(node: onnx.NodeProto, function: onnx.FunctionProto, prefix: str) -> list[onnx.NodeProto] | None:
    """``function``'s nodes wired to ``node``'s inputs, outputs and attributes."""
    graphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in graphs for n in function.node for a in n.attribute):
        return None
    names = dict(itertools.zip_longest(function.input, node.input, fillvalue=""))
    names.update(dict(itertools.zip_longest(function.output, node.output, fillvalue="")))
    names.pop("", None)
    attributes = {a.name: a for a in node.attribute}
    nodes = []
    for inner in function.node:
        new = onnx.NodeProto()
        new.CopyFrom(inner)
        del new.input[:], new.output[:], new.attribute[:]
        new.input.extend(names.get(n, prefix + n) if n else "" for n in inner.input)
        new.output.extend(names.get(n, prefix + n) if n else "" for n in inner.output)
        new.name = prefix + (inner.name or f"{inner.op_type}_{len(nodes)}")
        for attr in inner.attribute:
            if attr.ref_attr_name:
                if attr.ref_attr_name in attributes:
                    copy = onnx.AttributeProto()
                    copy.CopyFrom(attributes[attr.ref_attr_name])
                    copy.name = attr.name
                    new.attribute.append(copy)
            else:
                new.attribute.append(attr)
        nodes.append(new)
    return nodes


class ExpandFunctionOpsPass(ir.passes.FunctionalPass):
    def __init__(self, *, op_types: Iterable[str]) -> None:
        super().__init__()
        self.op_types = frozenset(op_types)
        self.expanded: collections.Counter[str] = collections.Counter()
        self.kept: set[str] = set()
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or not any(n.op_type in self.op_types and n.domain in ("", "ai.onnx") for n in model.graph):
            return ir.passes.PassResult(model.clone(), False)
        proto = ir.serde.serialize_model(model)
        try:
            inferred = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # types then come only from what the model states
            inferred = proto
        graph = inferred.graph
        types = {v.name: v.type for v in itertools.chain(graph.input, graph.value_info, graph.output)}
        types.update({t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims) for t in graph.initializer})
        new_nodes, changed = [], False
        for i, node in enumerate(proto.graph.node):
            body = None
            if node.op_type in self.op_types and node.domain in ("", "ai.onnx"):
                schema = onnx.defs.get_schema(node.op_type, opset, "")
                node = _with_defaults(node, schema)
                function = _function(schema, node, opset, types)
                body = _body(node, function, f"{node.op_type}_{i}_expanded_") if function is not None else None
                if body is None:
                    self.kept.add(node.op_type)
            if body is None:
                new_nodes.append(node)
                continue
            new_nodes.extend(body)
            self.expanded[node.op_type] += 1
            changed = True
        if not changed:
            return ir.passes.PassResult(model.clone(), False)
        del proto.graph.node[:]
        proto.graph.node.extend(new_nodes)
        self.note = ", ".join(f"{op} x{n}" for op, n in sorted(self.expanded.items()))
        return ir.passes.PassResult(ir.serde.deserialize_model(proto), True)


def _with_defaults(node: onnx.NodeProto, schema) -> onnx.NodeProto:
    """``node`` with the schema's default for every attribute it leaves unset."""
    present = {a.name for a in node.attribute}
    defaults = [a.default_value for name, a in schema.attributes.items()
                if name not in present and a.default_value is not None and a.default_value.name]
    if not defaults:
        return node
    filled = onnx.NodeProto()
    filled.CopyFrom(node)
    filled.attribute.extend(defaults)
    return filled
