"""ConvertFloat16Pass: float32 weights and compute to float16, I/O types kept."""

from __future__ import annotations

from typing import Sequence

import onnx
import onnx_ir as ir

from dlopt.core.errors import CompileError, first_line
from dlopt.passes._scope_order import sort_with_outer_reads, subgraphs

# Ops whose float16 forms lose too much (reductions over many elements, exponentials)
# or that ORT's CPU provider only has in float32; they run in float32 behind Casts.
DEFAULT_FP32_OPS = ("Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceLogSumExp", "Exp", "Log",
                    "Pow", "LayerNormalization", "InstanceNormalization", "Resize", "Range")


class ConvertFloat16Pass(ir.passes.FunctionalPass):
    """Convert float32 tensors and ops to float16 with ONNX Runtime's converter.

    Guarantees: graph inputs and outputs keep their float32 types unless
    ``keep_io_types=False``; ops in ``fp32_ops`` and nodes in ``fp32_nodes`` stay
    float32 with Casts around them.
    """

    def __init__(self, *, keep_io_types: bool = True, fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
                 fp32_nodes: Sequence[str] = ()) -> None:
        super().__init__()
        self.keep_io_types = keep_io_types
        self.fp32_ops = list(fp32_ops)
        self.fp32_nodes = list(fp32_nodes)
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        proto = ir.serde.serialize_model(model)
        try:
            converted = convert_float_to_float16(
                proto, keep_io_types=self.keep_io_types,
                op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(self.fp32_ops)),
                node_block_list=self.fp32_nodes,
            )
        except Exception as exc:
            raise CompileError(f"FP16 conversion failed: {first_line(exc)}") from exc
        casts = sum(1 for n in converted.graph.node if n.op_type == "Cast")
        self.note = f"{casts} Cast(s)"
        # The converter appends the output Casts at the end of the node list; an If branch may read one
        # of them from the outer scope, which onnx-ir's sort does not count (silero-vad's fp16)
        # (and adds Casts inside branches after the nodes that read them): sorted here, branches included
        sort_with_outer_reads(converted.graph)
        if any(subgraphs(n) for n in converted.graph.node):
            try:
                onnx.checker.check_model(converted)
            except onnx.checker.ValidationError as exc:
                # silero-vad: Casts in an If branch read tensors the converter renamed away
                raise CompileError(f"FP16 conversion failed: ONNX Runtime's float16 converter left an invalid "
                                   f"If/Loop branch ({first_line(exc)}); this model stays float32") from exc
        return ir.passes.PassResult(ir.serde.deserialize_model(converted), True)
