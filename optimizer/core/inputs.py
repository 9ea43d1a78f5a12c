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

from dlopt.core.errors import ConfigError, ModelError, first_line
from dlopt.core.layout import batch_axes

DEFAULT_INT_HIGH = 10
MASK_NAME = re.compile(r"mask", re.IGNORECASE)  # an input fed ones (keep every position), also in READMEs
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


def constant_arrays(specs: Sequence, constants: Mapping | None, shapes: Mapping | None = None) -> dict[str, np.ndarray]:
    """``--const NAME=VALUE`` as arrays of the input's dtype, one item of a batch (batch axis 1).

    A number fills the input: its batch axis gets 1 and its other symbolic dims must be fixed by
    ``--shape`` (the input's own, or by dim name); an array is taken as it is fed, rank for rank.
    """
    if not constants:
        return {}
    by_name = {s.name: s for s in specs}
    axes = batch_axes(specs)
    shapes = dict(shapes or {})
    result = {}
    for name, value in constants.items():
        spec = by_name.get(name)
        if spec is None:
            raise ConfigError(f"--const {name}: the model has no input {name!r}; its inputs: "
                              f"{', '.join(sorted(by_name))}")
        try:
            array = np.asarray(value)
            if array.dtype.kind not in "biuf":
                raise ValueError(f"a {array.dtype.name} value")
            array = array.astype(spec.dtype)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--const {name}: {first_line(exc)}; give a number or a numeric array") from exc
        if array.ndim == 0 and spec.shape:
            if name in shapes:
                target = tuple(shapes[name])
            else:
                target, open_dims = [], []
                for axis, dim in enumerate(spec.shape):
                    if isinstance(dim, int) and dim > 0:
                        target.append(dim)
                    elif axis == axes.get(name):
                        target.append(1)
                    elif isinstance(dim, str) and dim in shapes and len(shapes[dim]) == 1:
                        target.append(shapes[dim][0])
                    else:
                        open_dims.append(str(axis))
                if open_dims:
                    raise ConfigError(f"--const {name}={value} fills input {spec.describe()}, whose dim "
                                      f"{', '.join(open_dims)} nothing fixes: also pass --shape {name}=DxDx...")
            array = np.full(tuple(target), array, dtype=spec.dtype)
        elif array.ndim != len(spec.shape) or any(isinstance(d, int) and d > 0 and d != g
                                                  for d, g in zip(spec.shape, array.shape)):
            raise ConfigError(f"--const {name}: an array of shape {list(array.shape)} cannot be fed as "
                              f"{spec.describe()}")
        result[name] = array
    return result


class RandomInputs:
    """Reproducible random feeds for a model, at any concrete shapes; ``constants`` fed as given."""

    def __init__(self, specs: Sequence, limits: Mapping[str, int] | None = None,
                 constants: Mapping[str, np.ndarray] | None = None) -> None:
        self.specs = list(specs)
        self.limits = dict(limits or {})
        self.constants = dict(constants or {})

    @classmethod
    def for_model(cls, proto: onnx.ModelProto, specs: Sequence,
                  constants: Mapping[str, np.ndarray] | None = None) -> "RandomInputs":
        return cls(specs, index_limits(proto), constants)

    def feed(self, shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
        feed = {}
        for spec in self.specs:
            shape = tuple(shapes[spec.name])
            kind = spec.dtype.kind
            if spec.name in self.constants:
                value = self.constants[spec.name]
                feed[spec.name] = value if value.shape == shape else np.broadcast_to(value, shape).copy()
            elif kind == "f":
                feed[spec.name] = np.asarray(rng.standard_normal(shape)).astype(spec.dtype)
            elif kind in "iu" and MASK_NAME.search(spec.name):
                feed[spec.name] = np.ones(shape, spec.dtype)
            elif kind in "iu" and _POSITION.search(spec.name) and shape:
                feed[spec.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(spec.dtype).copy()
            elif kind in "iu":
                high = self.limits.get(spec.name, DEFAULT_INT_HIGH)
                feed[spec.name] = rng.integers(0, max(high, 1), size=shape).astype(spec.dtype)
            elif kind == "b":
                feed[spec.name] = np.ones(shape, bool) if MASK_NAME.search(spec.name) else np.asarray(rng.random(shape) < 0.5)
            else:
                raise ModelError(f"cannot make random data for input {spec.describe()}; pass --eval data.npz")
        return feed

    def feeds(self, shapes: Mapping[str, tuple[int, ...]], count: int, seed: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [self.feed(shapes, rng) for _ in range(count)]
