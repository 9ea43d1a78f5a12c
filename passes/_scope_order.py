"""Topological order of a main graph whose subgraphs read its tensors (If/Loop/Scan bodies).

ONNX lets a branch read any tensor of the enclosing graph without naming it as an input
of its If node.  A sort that counts only explicit inputs (ORT's quantiser, ORT's float16
converter, onnx-ir's TopologicalSortPass) can place the If before the node that makes
that tensor, and the checker then refuses the model ("Nodes in a graph must be
topologically sorted").  Here each node's outer-scope reads count as its inputs.
"""

from __future__ import annotations

import onnx


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` reads from enclosing scopes (not made by its own nodes, inputs or initializers)."""
    local = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    local |= {o for n in graph.node for o in n.output}
    reads = set()
    for node in graph.node:
        reads.update(node.input)
        for sub in subgraphs(node):
            reads |= outer_reads(sub)
    return reads - local - {""}


def sort_with_outer_reads(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """Sort ``graph.node`` (and, recursively, every subgraph's) so each node follows what it and its
    subgraphs read, keeping the given order wherever it was already valid; ``outer`` are names the
    enclosing scopes provide.  A cycle or a missing name is left to the checker's message."""
    reads = {id(n): set().union(*(outer_reads(g) for g in subgraphs(n))) for n in graph.node if subgraphs(n)}
    ready = set(outer) | {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        for k, node in enumerate(pending):
            if all(i in ready for i in node.input) and reads.get(id(node), set()) <= ready:
                break
        else:
            ordered.extend(pending)
            break
        ordered.append(pending.pop(k))
        ready.update(node.output)
    del graph.node[:]
    graph.node.extend(ordered)
    visible = frozenset(ready)
    for node in graph.node:
        for sub in subgraphs(node):
            sort_with_outer_reads(sub, visible)
