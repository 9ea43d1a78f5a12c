"""Facts about a graph that decide whether a tool can be trusted with it, before handing it over.

Two shapes of hostile (or just unusual) model make third-party tools blow up:
- control flow nested deeply: OpenVINO's ONNX converter takes time exponential in the
  nesting of ``If`` (4.5 s at depth 18, 62 s at 22; depth 30 never finishes);
- a small graph that generates a huge constant at run time (``ConstantOfShape`` of a
  constant shape): constant folding in ONNX Runtime, OpenVINO and TVM materialises it
  (576 MB for a 12000x12000 float), and calibration copies it once per sample.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Constants at most this big may be materialised (as dlopt.passes.fold_constants does).
GENERATED_CONSTANT_LIMIT = 64 << 20
# Deepest nesting of subgraphs handed to converters that are exponential in it.
CONTROL_FLOW_DEPTH_LIMIT = 8


def op_label(node) -> str:
    """How reports and messages name a node's operator: ``Conv`` for the default ONNX domain, else
    ``com.microsoft.FusedConv`` (an onnx_ir node or an ONNX NodeProto)."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def control_flow_depth(graph: ir.Graph) -> int:
    """How deeply subgraphs (If/Loop/Scan bodies) nest in ``graph``; 0 without control flow."""
    deepest = 0
    for node in graph:
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for sub in subgraphs:
                deepest = max(deepest, 1 + control_flow_depth(sub))
    return deepest


def largest_generated_constant(model: ir.Model) -> int:
    """Bytes of the largest tensor a ``ConstantOfShape`` with a constant shape produces at run time."""
    largest = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        shape = node.inputs[0]
        if shape is None or shape.const_value is None:
            continue
        value = node.attributes.get("value")
        itemsize = value.value.dtype.itemsize if value is not None else 4
        largest = max(largest, int(np.prod(shape.const_value.numpy(), dtype=np.int64)) * itemsize)
    return largest


def converter_hazards(model: ir.Model) -> list[str]:
    """Why a folding converter (OpenVINO, TVM) should not be given ``model``; empty when none."""
    hazards = []
    depth = control_flow_depth(model.graph)
    if depth > CONTROL_FLOW_DEPTH_LIMIT:
        hazards.append(f"control flow nested {depth} deep (limit {CONTROL_FLOW_DEPTH_LIMIT})")
    size = largest_generated_constant(model)
    if size > GENERATED_CONSTANT_LIMIT:
        hazards.append(f"ConstantOfShape generating {size / 1e6:.0f} MB (limit {GENERATED_CONSTANT_LIMIT >> 20} MB)")
    return hazards


_SEQUENCE_OPS = frozenset({"SplitToSequence", "ConcatFromSequence"})


def has_sequences(model: ir.Model) -> bool:
    """Whether ``model`` makes or takes sequences or optionals (ops of those types, or such inputs/outputs)."""
    if any(v.type is not None and not isinstance(v.type, ir.TensorType)
           for v in (*model.graph.inputs, *model.graph.outputs)):
        return True
    return any(n.op_type.startswith(("Sequence", "Optional")) or n.op_type in _SEQUENCE_OPS
               for n in ir.traversal.RecursiveGraphIterator(model.graph))


def has_subgraphs(model: ir.Model) -> bool:
    """Whether ``model`` has control flow (If, Loop, Scan, SequenceMap bodies)."""
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for node in ir.traversal.RecursiveGraphIterator(model.graph) for attr in node.attributes.values())
