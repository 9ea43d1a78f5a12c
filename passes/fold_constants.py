"""FoldConstantsPass: partial evaluation that onnxsim leaves undone."""

from __future__ import annotations

import onnx_ir as ir


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold subgraphs whose values are known before run time, with onnxscript's constant folder.

    onnxsim folds only nodes whose inputs are all constants; onnxscript's folder also
    uses what is known of non-constant values (their type and shape), so
    ``Expand(CastLike(0, x), Shape(w)[:1])`` — the zero bias torch's exporter gives a
    bias-free Conv — becomes one constant.  Guarantees: outputs unchanged; folded
    values above onnxscript's size limits stay as they are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.optimizer import fold_constants

        before = sum(1 for _ in model.graph)
        result = fold_constants(model)
        removed = before - sum(1 for _ in model.graph)
        self.note = f"{removed} node(s) folded" if removed > 0 else ""
        return ir.passes.PassResult(model, bool(getattr(result, "modified", removed > 0)))
