"""FoldShapeArithmeticPass: with static input shapes, every value computed from shapes becomes a constant.

Transformer exports compute their masks and reshape targets from the input shapes
(``Shape -> Gather -> Range/Unsqueeze -> Concat -> Reshape/Expand``, a ``ConstantOfShape``
fill ``And``-ed with a ``Range`` comparison).  Once ``FixInputShapesPass`` has fixed the
inputs, those values are known before run time, but one round of shape inference and
folding leaves most of them in place: the exporter's value_info keeps symbolic dims
(``unk__0``) that the folder prefers to the inferred sizes, folded initializers keep the
symbolic shape of the value they replace, and onnxscript never folds ``ConstantOfShape``.
This pass repeats inference and folding from refreshed shapes until the graph stops
shrinking, folding small ``ConstantOfShape`` nodes too.

Guarantees:

* Outputs are unchanged for inputs of the fixed shapes; nodes that depend on input
  values stay.
* A ``ConstantOfShape`` is folded only when its output takes at most ``fill_limit`` bytes;
  other nodes follow ``FoldConstantsPass``'s limits.
* Only symbolic (stale) shapes of the main graph's values are dropped before inference;
  static ones are kept.
"""

from __future__ import annotations

import onnx_ir as ir

from dlopt.passes.fold_constants import FoldConstantsPass, _static_bytes

MAX_ROUNDS = 8  # each round folds at least one more link of a shape chain; real exports need 3


class _FoldSmallFills(FoldConstantsPass):
    def __init__(self, *, fill_limit: int) -> None:
        super().__init__()
        self.fill_limit = fill_limit

    def _should_fold(self, node: ir.Node) -> bool | None:
        if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx"):
            (out,) = node.outputs
            if out.shape is not None and out.shape.is_static() and _static_bytes(out) <= self.fill_limit:
                return True
        return super()._should_fold(node)


def _drop_symbolic_shapes(graph: ir.Graph) -> None:
    for value in graph.initializers.values():
        if value.const_value is not None:
            value.shape = value.const_value.shape  # a folded value keeps the shape it was declared with
    for node in graph:
        for value in node.outputs:
            if value.shape is not None and not value.shape.is_static():
                value.shape = None


class FoldShapeArithmeticPass(ir.passes.InPlacePass):
    def __init__(self, *, fill_limit: int = 64 << 10) -> None:
        super().__init__()
        self.fill_limit = fill_limit
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

        start = count = sum(1 for _ in model.graph)
        for _ in range(MAX_ROUNDS):
            _drop_symbolic_shapes(model.graph)
            model = ShapeInferencePass(strict_mode=False)(model).model
            model = _FoldSmallFills(fill_limit=self.fill_limit)(model).model
            model = RemoveUnusedNodesPass()(model).model
            before, count = count, sum(1 for _ in model.graph)
            if count >= before:
                break
        self.note = f"{start - count} node(s) folded" if count < start else ""
        return ir.passes.PassResult(model, count < start)
