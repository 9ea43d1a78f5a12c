"""FixInputShapesPass: give the graph inputs the concrete shapes they will be run with.

With every input dimension known, shape inference knows the shape of every value, and
``FoldConstantsPass`` turns ``Shape``/``Size`` and the arithmetic on them into
constants: the shape computations of function bodies expanded into the graph
(``*_expanded`` models) then reach a static-shape compiler as constants, not as
run-time shape expressions (TVM: "cannot handle ShapeExpr inputs").

Guarantees:

* Only inputs named in ``shapes`` change, and only their symbolic or unknown
  dimensions: a fixed dimension that disagrees with the given shape, or a rank
  that differs, raises ValueError naming the input.
* Types and values are untouched; the model still takes the same feeds of those shapes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import onnx_ir as ir


class FixInputShapesPass(ir.passes.InPlacePass):
    def __init__(self, *, shapes: Mapping[str, Sequence[int]]) -> None:
        super().__init__()
        self.shapes = {k: tuple(int(d) for d in v) for k, v in shapes.items()}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in model.graph.inputs:
            shape = self.shapes.get(value.name)
            if shape is None:
                continue
            if value.shape is not None:
                if value.shape.rank() != len(shape):
                    raise ValueError(f"input {value.name!r} has rank {value.shape.rank()}, given shape {shape}")
                fixed = [(d, n) for d, n in zip(value.shape.dims, shape) if isinstance(d, int)]
                if any(d != n for d, n in fixed):
                    raise ValueError(f"input {value.name!r} has shape {value.shape}, given shape {shape}")
                if len(fixed) == len(shape):
                    continue
            value.shape = ir.Shape(shape)
            modified = True
        return ir.passes.PassResult(model, modified)
