"""UnshareIntegerWeightsPass: each integer op of an ONNX Runtime-quantised model gets its own constants.

Models already quantised by ONNX Runtime (``ConvInteger``, ``MatMulInteger``,
``DynamicQuantizeLSTM``, ``QLinear*``) carry one zero point or weight per op.  dlopt's
generic passes merge equal initializers, and ORT's int8 precision transformer
(``session.x64quantprecision``, which every ORT session dlopt ships sets) then adds an
s8 copy of a shared one twice and refuses the session: "AddInitializedOrtValue
Attempt to replace the existing tensor" (ddddocr's common_old.onnx).

Guarantees: every initializer read by more than one of these ops is copied, under a
new unique name, for each reader after the first; values and every other node are
unchanged.
"""

from __future__ import annotations

import onnx_ir as ir
from dlopt.passes._names import unique_name
from onnx_ir.passes import InPlacePass, PassResult

INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM", "QLinearConv", "QLinearMatMul",
                         "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLinear"})


class UnshareIntegerWeightsPass(InPlacePass):
    """Copy initializers that several ONNX Runtime integer ops share, one per op (see module doc)."""

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        names = set(graph.initializers)
        seen: set[str] = set()
        copies = 0
        for node in graph:
            if node.op_type not in INTEGER_OPS:
                continue
            for index, value in enumerate(node.inputs):
                if value is None or not value.is_initializer() or value.const_value is None:
                    continue
                if value.name not in seen:
                    seen.add(value.name)
                    continue
                name = unique_name(f"{value.name}_{node.op_type.lower()}", names)
                copy = ir.Value(name=name, shape=value.shape, type=value.type, const_value=value.const_value)
                graph.register_initializer(copy)
                node.replace_input_with(index, copy)
                names.add(name)
                copies += 1
        return PassResult(model, modified=copies > 0)
