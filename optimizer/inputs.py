"""Random inputs that a real model can run: indices within their tables, masks of ones.

Without evaluation data dlopt compares candidates on random feeds.  Integers drawn
from 0-9 crash real models (a BERT ``token_type_ids`` indexes a 2-row table), so an
integer input that feeds a ``Gather`` over a constant table is drawn below that
table's size along the gathered axis, inputs named like masks are ones, and inputs
named like positions count up.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import onnx

from dlopt.errors import ModelError

DEFAULT_INT_HIGH = 10
_MASK = re.compile(r"mask", re.IGNORECASE)
_POSITION = re.compile(r"position", re.IGNORECASE)


def index_limits(proto: onnx.ModelProto) -> dict[str, int]:
    """For each graph input used as ``Gather`` indices into a constant: the table's size (smallest use)."""
    sizes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    sizes[node.output[0]] = tuple(attr.t.dims)
    inputs = {v.name for v in proto.graph.input} - {t.name for t in proto.graph.initializer}
    limits: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in inputs:
            continue
        table = sizes.get(node.input[0])
        if not table:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        size = table[axis % len(table)]
        limits[node.input[1]] = min(size, limits.get(node.input[1], size))
    return limits


class RandomInputs:
    """Reproducible random feeds for a model, at any concrete shapes."""

    def __init__(self, specs: Sequence, limits: Mapping[str, int] | None = None) -> None:
        self.specs = list(specs)
        self.limits = dict(limits or {})

    @classmethod
    def for_model(cls, proto: onnx.ModelProto, specs: Sequence) -> "RandomInputs":
        return cls(specs, index_limits(proto))

    def feed(self, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.specs:
            shape = tuple(shapes[spec.name])
            kind = spec.dtype.kind
            if kind == "f":
                feed[spec.name] = np.asarray(rng.standard_normal(shape)).astype(spec.dtype)
            elif kind in "iu" and _MASK.search(spec.name):
                feed[spec.name] = np.ones(shape, spec.dtype)
            elif kind in "iu" and _POSITION.search(spec.name) and shape:
                feed[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype).copy()
            elif kind in "iu":
                high = self.limits.get(spec.name, DEFAULT_INT_HIGH)
                feed[spec.name] = rng.integers(0, max(high, 1), size=shape).astype(spec.dtype)
            elif kind == "b":
                feed[spec.name] = np.ones(shape, bool) if _MASK.search(spec.name) else np.asarray(rng.random(shape) < 0.5)
            else:
                raise ModelError(f"cannot make random data for input {spec.describe()}; pass --eval data.npz")
        return feed

    def feeds(self, shapes: Mapping[str, tuple[int, ...]], count: int, seed: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [self.feed(shapes, rng) for _ in range(count)]
