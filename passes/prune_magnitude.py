"""MagnitudePrunePass: unstructured pruning, zeroing the smallest weights of each layer.

Guarantees:

* For every Conv, ConvTranspose, Gemm and MatMul whose weight (input 1) is a float
  initializer with at least ``min_elements`` values, exactly ``floor(sparsity * n)``
  of its ``n`` values are zero afterwards (values already zero count; ties at the
  threshold are broken by position, so the count is exact).  A weight shared by several
  nodes is pruned once.  Nothing else changes: no node is added or removed.
* :attr:`layers` lists each pruned weight with its sparsity before and after;
  :attr:`sparsity` is the fraction of zeros over all of them; :attr:`note` says so and
  gives the deflate-compressed size of those weights before and after.

What it does not do, said plainly in the note: dense backends (ONNX Runtime, OpenVINO,
TVM, TensorRT on these layers) multiply the zeros like any other value, so the model
runs no faster; it compresses better (a zipped artefact, an over-the-air update).
Accuracy is whatever the zeros leave: the compile measures it against the original like
any other change.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class PrunedWeight:
    name: str
    node: str
    elements: int
    sparsity_before: float
    sparsity_after: float


def _deflated(arrays: list[np.ndarray]) -> int:
    compressor = zlib.compressobj(6)
    size = sum(len(compressor.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)
    return size + len(compressor.flush())


class MagnitudePrunePass(ir.passes.InPlacePass):
    def __init__(self, *, sparsity: float = 0.5, min_elements: int = 64, op_types: tuple[str, ...] = WEIGHT_OPS) -> None:
        super().__init__()
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity is the fraction of weights to zero, between 0 and 1 (exclusive), got {sparsity}")
        self.target = sparsity
        self.min_elements = min_elements
        self.op_types = op_types
        self.layers: list[PrunedWeight] = []
        self.sparsity = 0.0
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.layers = []
        self.facts = {}
        seen: set[int] = set()
        before_arrays, after_arrays = [], []
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx") or node.op_type not in self.op_types or len(node.inputs) < 2:
                continue
            weight = node.inputs[1]
            tensor = weight.const_value if weight is not None else None
            if tensor is None or id(weight) in seen or not weight.is_initializer():
                continue
            array = tensor.numpy()
            if array.dtype.kind != "f" or array.size < self.min_elements:
                continue
            seen.add(id(weight))
            pruned = array.copy()
            flat = pruned.reshape(-1)
            count = int(math.floor(self.target * flat.size))
            zeros_before = int(np.count_nonzero(flat == 0))
            if count > 0:
                flat[np.argpartition(np.abs(flat), count - 1)[:count]] = 0
            weight.const_value = ir.tensor(pruned, name=tensor.name)
            before_arrays.append(array)
            after_arrays.append(pruned)
            self.layers.append(PrunedWeight(weight.name or "", node.name or node.op_type, int(flat.size),
                                            zeros_before / flat.size, int(np.count_nonzero(flat == 0)) / flat.size))
        total = sum(layer.elements for layer in self.layers)
        if not total:
            self.note = "no Conv/Gemm/MatMul weights large enough to prune; the model is unchanged"
            return ir.passes.PassResult(model, False)
        zeros = sum(layer.sparsity_after * layer.elements for layer in self.layers)
        self.sparsity = zeros / total
        low = min(layer.sparsity_after for layer in self.layers)
        before, after = _deflated(before_arrays), _deflated(after_arrays)
        self.facts = {"sparsity": self.sparsity, "weights": total, "deflated_bytes_before": before,
                      "deflated_bytes_after": after}
        self.note = (f"zeroed the smallest weights of {len(self.layers)} layers: {self.sparsity:.1%} of their "
                     f"{total:,} weights are zero (lowest layer {low:.1%}); deflate-compressed "
                     f"{before / 1e6:.2f} -> {after / 1e6:.2f} MB. "
                     f"Dense backends multiply zeros too: this gains compressed size, not speed")
        return ir.passes.PassResult(model, True)
