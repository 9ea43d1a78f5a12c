"""FuseActivationForOrtPass: Conv/Gemm followed by an activation -> ORT's fused contrib ops.

Standard ONNX has no fused Conv+activation op, so this rewrite is specific to
ONNX Runtime (``com.microsoft.FusedConv`` / ``FusedGemm``) and runs only in
pipelines for the ``ort`` backend.  It is the offline form of the fusion ORT's
graph optimiser performs at session start, so the saved artefact shows (and
the report counts) the fused graph users will actually run.
"""

from __future__ import annotations

from dlopt.passes._rules import RulesPass

# activation op -> its attributes as FusedConv's activation_params, in order
_CONV_ACTIVATIONS = {"Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": (("alpha", 0.01),)}


def _make_rules() -> list:
    import onnx_ir as ir
    from onnxscript.rewriter import RewriteRuleClassBase
    from onnxscript.rewriter._basics import MatchResult

    def _float32(value) -> bool:
        return value.dtype == ir.DataType.FLOAT

    class _FuseBase(RewriteRuleClassBase):
        activation: str
        producer: str

        def pattern(self, op, x):
            inner = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["inner"])
            return getattr(op, self.activation)(inner, _outputs=["act"])

        def check(self, context, x, inner, act, **_):
            result = MatchResult()
            if not _float32(x):
                return result.fail(f"FusedConv/FusedGemm on CPU take float32, got {x.dtype}")
            if len(inner.uses()) != 1 or inner.is_graph_output():
                return result.fail(f"{self.producer} output is used elsewhere")
            return result

        def _activation_attr(self, act) -> dict:
            node = act.producer()
            return {
                name: node.attributes[name].as_float() if name in node.attributes else default
                for name, default in _CONV_ACTIVATIONS[self.activation]
            }

    class FuseConvActivation(_FuseBase):
        producer = "Conv"

        def rewrite(self, op, x, inner, act, **_):
            conv = inner.producer()
            params = list(self._activation_attr(act).values())
            extra = {"activation_params": params} if params else {}
            return op.FusedConv(
                *conv.inputs, activation=self.activation, _domain="com.microsoft",
                **{k: v for k, v in conv.attributes.items()}, **extra,
            )

    class FuseGemmActivation(_FuseBase):
        producer = "Gemm"

        def rewrite(self, op, x, inner, act, **_):
            gemm = inner.producer()
            params = self._activation_attr(act)
            extra = {"activation_alpha": params["alpha"]} if "alpha" in params else {}
            return op.FusedGemm(
                *gemm.inputs, activation=self.activation, _domain="com.microsoft",
                **{k: v for k, v in gemm.attributes.items()}, **extra,
            )

    rules = []
    for activation in _CONV_ACTIVATIONS:
        for base in (FuseConvActivation, FuseGemmActivation):
            cls = type(f"{base.__name__}{activation}", (base,), {"activation": activation})
            rules.append(cls.rule())
    return rules


class FuseActivationForOrtPass(RulesPass):
    """Rewrite ``Act(Conv(...))`` and ``Act(Gemm(...))`` as ORT ``FusedConv``/``FusedGemm``.

    Guarantees: only float32 producers whose output feeds nothing but the
    activation are fused; Relu, Sigmoid, Tanh and LeakyRelu (with its alpha).
    """

    def rules(self) -> list:
        return _make_rules()
