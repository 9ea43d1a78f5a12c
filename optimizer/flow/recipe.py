"""The INT8 recipe, chosen by what the graph contains, before calibration.

Plain post-training quantisation (every op, min-max ranges, one scale per
activation) is right for CNNs and wrong for attention models:

- a graph with attention (a Softmax whose output reaches a MatMul, or a fused
  attention op) keeps Softmax, its normalisations (LayerNormalization, Erf/Gelu)
  and the residual Adds in float: only the ops that carry weights (Conv,
  ConvTranspose, MatMul, Gemm) are quantised, and ranges come from a percentile
  of the activations, because a few outliers dominate min-max. A Softmax that
  only ends a classifier does not make a CNN an attention model;
- a transformer (attention, and more weights in MatMul/Gemm than in convolutions)
  also gets SmoothQuant: activation outlier channels are migrated into the
  following weights before calibration (``dlopt.passes.smooth_quant``), and NNCF,
  where it quantises, is told the model is a transformer.

``CompileConfig.data.calib_method`` other than ``auto`` overrides the range method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import onnx_ir as ir

WEIGHT_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Fused attention ops (ONNX opset 23, ONNX Runtime's contrib ops): attention without a visible Softmax.
_FUSED_ATTENTION = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                              "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention"})
# What may sit between attention's Softmax and the MatMul with V: casts, layout, dropout, masking.
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Transpose", "Dropout", "Identity", "Squeeze", "Unsqueeze",
                           "Flatten", "Expand", "Where", "Mul", "Div"})
_MATMULS = frozenset({"MatMul", "Einsum"})
SMOOTH_ALPHA = 0.5


@dataclass(frozen=True)
class Recipe:
    kind: str  # "cnn" | "attention" | "transformer"
    op_types: tuple[str, ...] | None  # ops the static quantiser touches; None = ONNX Runtime's defaults
    calib_method: str
    smooth_alpha: float | None  # SmoothQuant migration strength, None when not smoothed

    @property
    def transformer(self) -> bool:
        return self.kind == "transformer"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["op_types"] = list(self.op_types) if self.op_types else "onnxruntime defaults"
        return data


def weights_in(model: ir.Model, op_types: tuple[str, ...]) -> int:
    """Number of constant weight elements consumed by nodes of ``op_types``."""
    total = 0
    for node in model.graph:
        if node.op_type in op_types:
            total += sum(v.const_value.size for v in node.inputs[1:2] if v is not None and v.const_value is not None)
    return total


def _softmax_feeds_matmul(softmax: ir.Node) -> bool:
    frontier, seen = list(softmax.outputs), set()
    while frontier:
        value = frontier.pop()
        for user, _ in value.uses():
            if user.op_type in _MATMULS:
                return True
            if user.op_type in _PASS_THROUGH and user not in seen:
                seen.add(user)
                frontier.extend(user.outputs)
    return False


def has_attention(model: ir.Model) -> bool:
    """A fused attention op, or a Softmax whose output reaches a MatMul (through casts, reshapes, dropout)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    return any(n.op_type in _FUSED_ATTENTION for n in nodes) or any(
        _softmax_feeds_matmul(n) for n in nodes if n.op_type == "Softmax")


def choose(model: ir.Model, calib_method: str = "auto") -> Recipe:
    if not has_attention(model):
        return Recipe("cnn", None, "minmax" if calib_method == "auto" else calib_method, None)
    transformer = weights_in(model, ("MatMul", "Gemm")) > weights_in(model, ("Conv", "ConvTranspose"))
    method = "percentile" if calib_method == "auto" else calib_method
    if transformer:
        return Recipe("transformer", WEIGHT_OPS, method, SMOOTH_ALPHA)
    return Recipe("attention", WEIGHT_OPS, method, None)
