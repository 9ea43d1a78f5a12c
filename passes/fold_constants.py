"""FoldConstantsPass: partial evaluation that onnxsim leaves undone."""

from __future__ import annotations

import math

import onnx_ir as ir

# Folded constants over this many bytes stay the node that computes them (ConstantOfShape,
# Expand, Tile, Range): a 200-byte model must not become a 600 MB one, and computing the
# value only to throw it away would cost that memory anyway.
DEFAULT_FOLD_LIMIT = 64 << 20


def _static_bytes(value: ir.Value | None) -> int:
    """Bytes of ``value`` if its dtype and shape are known, else 0."""
    if value is None or value.dtype is None or value.shape is None or not value.shape.is_static():
        return 0
    return math.ceil(math.prod(value.shape.numpy()) * value.dtype.itemsize)


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold subgraphs whose values are known before run time, with onnxscript's constant folder.

    onnxsim folds only nodes whose inputs are all constants; onnxscript's folder also
    uses what is known of non-constant values (their type and shape), so
    ``Expand(CastLike(0, x), Shape(w)[:1])`` — the zero bias torch's exporter gives a
    bias-free Conv — becomes one constant.  Guarantees: outputs unchanged; folded
    values above onnxscript's size limits stay as they are, and a node whose outputs
    would take more than ``size_limit`` bytes, more than its constant inputs, is not
    even evaluated.
    """

    def __init__(self, *, size_limit: int = DEFAULT_FOLD_LIMIT) -> None:
        super().__init__()
        self.size_limit = size_limit
        self.note = ""

    def _should_fold(self, node: ir.Node) -> bool | None:
        produced = sum(_static_bytes(v) for v in node.outputs)
        if produced <= self.size_limit:
            return None  # onnxscript's own rules decide
        consumed = sum(v.const_value.nbytes for v in node.inputs if v is not None and v.const_value is not None)
        return False if produced > consumed else None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        before = sum(1 for _ in model.graph)
        # onnxscript rewrites CastLike(saturate=0) as a Cast without `saturate` (onnxscript 0.7.2), which
        # saturates float8 results the model says must not be: the attribute is put back on that Cast.
        saturate = {node.outputs[0].name: node.attributes["saturate"].value
                    for node in ir.traversal.RecursiveGraphIterator(model.graph)
                    if node.op_type == "CastLike" and node.domain in ("", "ai.onnx") and "saturate" in node.attributes}
        result = fold_constants(model, should_fold=self._should_fold)
        for node in ir.traversal.RecursiveGraphIterator(model.graph) if saturate else ():
            if node.op_type == "Cast" and node.outputs[0].name in saturate and "saturate" not in node.attributes:
                node.attributes["saturate"] = ir.AttrInt64("saturate", saturate[node.outputs[0].name])
        removed = before - sum(1 for _ in model.graph)
        self.note = f"{removed} node(s) folded" if removed > 0 else ""
        return ir.passes.PassResult(model, bool(getattr(result, "modified", removed > 0)))
