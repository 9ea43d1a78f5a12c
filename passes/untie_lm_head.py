"""UntieLmHeadPass: a decoder's output head gets a weight of its own instead of the embedding table's transpose.

A causal LM with tied embeddings (SmolLM2, Llama 3.2 1B, Qwen2.5 0.5B) reads one table twice: the embedding
``Gather(E, input_ids)`` and the head ``MatMul(hidden, Transpose(E))`` that produces the logits.  That is how
dlopt's export (and optimum's) writes it.  ONNX Runtime's weight-only quantiser quantises only a MatMul whose
weight is an initializer, so it skips that head without a word, and the head is the largest MatMul of a small
decoder (576 x 49152 in SmolLM2-135M).

Guarantees: when the MatMul producing ``output`` reads ``Transpose(E)`` (perm [1, 0] or none) of a 2-D float
initializer E that another node also reads, the MatMul reads a new initializer ``<E>.T`` holding E's transpose
instead; E, its other readers and every other node are unchanged, and the Transpose is removed once nothing
reads it.  The logits are the same values, computed from the same numbers.  Any other model is returned
unchanged, with ``note`` saying why.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from dlopt.passes._names import unique_name
from onnx_ir.passes import InPlacePass, PassResult


class UntieLmHeadPass(InPlacePass):
    """Give the head MatMul producing ``output`` its own transposed copy of a tied embedding table."""

    def __init__(self, *, output: str = "logits") -> None:
        super().__init__()
        self.output = output
        self.note = ""
        self.added_bytes = 0

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        self.added_bytes = 0
        head, transpose, table, why = tied_head(graph, self.output)
        if why:
            self.note = f"unchanged: {why}"
            return PassResult(model, modified=False)
        weight = np.ascontiguousarray(table.const_value.numpy().T)
        name = unique_name(f"{table.name}.T", set(graph.initializers))
        untied = ir.Value(name=name, shape=ir.Shape(weight.shape), type=table.type,
                          const_value=ir.Tensor(weight, name=name))
        graph.register_initializer(untied)
        head.replace_input_with(1, untied)
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            graph.remove(transpose, safe=True)
        self.added_bytes = weight.nbytes
        self.note = (f"head {head.name or '(unnamed)'} reads {name} {list(weight.shape)} instead of "
                     f"Transpose({table.name}): +{weight.nbytes / 1e6:.1f} MB float")
        return PassResult(model, modified=True)


def head_node(graph: ir.Graph, output: str = "logits") -> ir.Node | None:
    """The node producing the graph output ``output``, or None."""
    value = next((v for v in graph.outputs if v.name == output), None)
    return value.producer() if value is not None else None


def tied_head(graph: ir.Graph, output: str = "logits"):
    """(head MatMul, Transpose node, table E, "") for a head reading ``Transpose(E)`` of a shared 2-D float
    initializer; otherwise (…, reason) with the reason the head is not a tied one."""
    head = head_node(graph, output)
    if head is None:
        return None, None, None, f"no node produces a graph output named {output!r}"
    label = f"{output} is produced by {head.op_type} {head.name or '(unnamed)'}"
    if head.op_type != "MatMul" or head.domain not in ("", "ai.onnx") or len(head.inputs) != 2:
        return head, None, None, f"{label}, not a MatMul"
    transpose = head.inputs[1].producer() if head.inputs[1] is not None else None
    if transpose is None or transpose.op_type != "Transpose" or transpose.domain not in ("", "ai.onnx"):
        return head, None, None, f"{label}, whose weight is not a Transpose: no tied head"
    table = transpose.inputs[0]
    perm = transpose.attributes.get("perm")
    if (not table.is_initializer() or table.is_graph_input() or table.const_value is None
            or len(table.const_value.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0])
            or table.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)):
        return head, transpose, None, f"{label}, whose weight is a Transpose of no 2-D float initializer"
    others = [u.node for u in table.uses() if u.node is not transpose]
    if not others:
        return head, transpose, table, (f"{label} from Transpose({table.name}), a table nothing else reads: "
                                        "not tied")
    return head, transpose, table, ""
