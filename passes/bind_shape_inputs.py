"""BindShapeInputsPass: graph inputs that only set shapes, axes or counts become constants.

Compilers that build for static shapes (TVM's Relax frontend: "Only constant axes
currently supported", "TopK k must be a constant") cannot take a ``Reshape`` target,
reduction axes or a ``TopK`` k as a run-time input.  A caller that knows the values
an input will have (the ONNX backend API compiles at the first run) binds them here,
and the model computes what it computed for those values.

Guarantees:

* Only inputs whose every use is a shape-like operand (``SHAPE_OPERANDS``) of an
  ONNX-domain node are bound; any other input, float data included, stays an input.
* A bound input becomes an initializer holding exactly the given array (dtype and
  shape checked against the input's declared type), and leaves ``graph.inputs``.
* ``bound`` lists the names bound, in graph order; the caller must rebuild when a
  later run brings other values for them.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_ir as ir

_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
_WINDOWS = ("HannWindow", "HammingWindow", "BlackmanWindow")

# op type -> operand positions that fix the output's shape or stand for an attribute
SHAPE_OPERANDS: dict[str, frozenset[int]] = {
    **{op: frozenset({1}) for op in _REDUCE},
    **{op: frozenset({0}) for op in _WINDOWS},
    "Reshape": frozenset({1}), "Expand": frozenset({1}), "Tile": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}), "Squeeze": frozenset({1}), "Unsqueeze": frozenset({1}),
    "Pad": frozenset({1, 2, 3}), "Resize": frozenset({1, 2, 3}), "Upsample": frozenset({1}),
    "TopK": frozenset({1}), "Split": frozenset({1}), "ConstantOfShape": frozenset({0}),
    "Range": frozenset({0, 1, 2}), "OneHot": frozenset({1, 2}), "CumSum": frozenset({1}),
    "Trilu": frozenset({1}), "CenterCropPad": frozenset({1, 2}), "Col2Im": frozenset({1, 2, 3}),
    "DFT": frozenset({1, 2}), "STFT": frozenset({1, 3}), "MelWeightMatrix": frozenset({0, 1, 2, 3, 4}),
    "NonMaxSuppression": frozenset({2, 3, 4}), "AffineGrid": frozenset({1}), "Compress": frozenset({1}),
    "SplitToSequence": frozenset({1}), "SequenceAt": frozenset({1}), "SequenceInsert": frozenset({2}),
    "SequenceErase": frozenset({1}),
}


def shape_inputs(model: ir.Model) -> list[str]:
    """Names of ``model``'s graph inputs used only as shape-like operands, in graph order."""
    names = []
    for value in model.graph.inputs:
        uses = value.uses()
        if uses and all(use.node.domain in ("", "ai.onnx") and use.idx in SHAPE_OPERANDS.get(use.node.op_type, ())
                        for use in uses):
            names.append(value.name)
    return names


class BindShapeInputsPass(ir.passes.InPlacePass):
    """Turn the shape-like inputs named in ``values`` into initializers holding those values."""

    def __init__(self, *, values: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.values = dict(values)
        self.bound: list[str] = []
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        wanted = set(shape_inputs(model)) & set(self.values)
        self.bound = [v.name for v in model.graph.inputs if v.name in wanted]
        for name in self.bound:
            value = next(v for v in model.graph.inputs if v.name == name)
            array = np.asarray(self.values[name])
            if value.dtype is not None and array.dtype != value.dtype.numpy():
                raise ValueError(f"input {name!r} is {value.dtype.numpy()}, the value to bind is {array.dtype}")
            if value.shape is not None and (value.shape.rank() != array.ndim or not all(
                    not isinstance(d, int) or d == n for d, n in zip(value.shape.dims, array.shape))):
                raise ValueError(f"input {name!r} has shape {value.shape}, the value to bind {array.shape}")
            model.graph.inputs.remove(value)
            value.const_value = ir.tensor(array, name=name)
            value.shape = ir.Shape(array.shape)
            model.graph.register_initializer(value)
        self.note = f"bound {', '.join(self.bound)}" if self.bound else ""
        return ir.passes.PassResult(model, bool(self.bound))
