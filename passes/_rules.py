"""Shared base for passes made of onnxscript rewrite rules."""

from __future__ import annotations

import onnx_ir as ir


class RulesPass(ir.passes.InPlacePass):
    """Apply a set of onnxscript rewrite rules; ``note`` counts the rewrites.

    Subclasses return their rules from ``rules()`` so onnxscript (about 1 s to
    import) is loaded only when a pass actually runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.note = ""

    def rules(self) -> list:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.rewriter import RewriteRuleSet

        count = RewriteRuleSet(self.rules()).apply_to_model(model)
        self.note = f"{count} rewrite(s)" if count else ""
        return ir.passes.PassResult(model, bool(count))
