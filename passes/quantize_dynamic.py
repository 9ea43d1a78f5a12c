"""QuantizeDynamicPass: INT8 weights with activations quantised at run time."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from dlopt.passes._ort_quant import quantise_to_proto


class QuantizeDynamicPass(ir.passes.FunctionalPass):
    """ONNX Runtime's dynamic quantisation, for MatMul-heavy (transformer, MLP) models.

    Weights of ``op_types`` become int8, per output channel by default (from opset 13;
    per tensor below it): a transformer's weight columns differ in scale, and one
    scale for all zeroes the small ones (all-MiniLM-L6-v2: min embedding cosine 0.926
    per tensor, 0.986 per channel).  Activation scales are computed per batch at run
    time, so no calibration data is needed.
    """

    def __init__(self, *, op_types: Sequence[str] = ("MatMul", "Gemm"), per_channel: bool = True,
                 exclude_nodes: Sequence[str] = ()) -> None:
        super().__init__()
        self.op_types = list(op_types)
        self.per_channel = per_channel
        self.exclude_nodes = tuple(exclude_nodes)
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        proto = ir.serde.serialize_model(model)
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        per_channel = self.per_channel and opset >= 13  # per-channel Q/DQ (their axis) needs opset 13
        quantized = quantise_to_proto(
            lambda out: quantize_dynamic(proto, out, op_types_to_quantize=self.op_types, per_channel=per_channel,
                                         weight_type=QuantType.QInt8, nodes_to_exclude=list(self.exclude_nodes)),
            "dynamic INT8 quantisation")
        n = sum(1 for node in quantized.graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"))
        self.note = f"{n} integer MatMul(s), {'per-channel' if per_channel else 'per-tensor'} weights"
        return ir.passes.PassResult(ir.serde.deserialize_model(quantized), n > 0)
