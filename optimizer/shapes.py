"""The declared timing shape: one concrete shape per input, stated in every report.

Latency means nothing without the shape it was timed at.  Batch comes from
``--batch`` (1 by default) and applies to a symbolic first dimension; any input can
be pinned with ``--shape name=1x3x224x224``; other symbolic dimensions are taken
from the evaluation data's per-sample shape (never from a loader's chunk size).  A
symbolic dimension none of these fixes is an error naming the input and the dim:
guessing 1 for an image height times a model on a 1x1 picture.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from dlopt.errors import ConfigError

Shape = tuple[int, ...]


def parse_shape(text: str) -> tuple[str, Shape]:
    """``name=1x3x224x224`` → (name, (1, 3, 224, 224)); a ConfigError for anything else."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
        raise ConfigError(f"--shape takes NAME=DxDx... (e.g. x=1x3x224x224), got {text!r}")
    shape = tuple(int(d) for d in dims.split("x"))
    if 0 in shape:
        raise ConfigError(f"--shape {text!r}: dimensions must be at least 1")
    return name, shape


def _dim_label(dim) -> str:
    return f"{dim!r}" if isinstance(dim, str) else "unnamed"


def declared_shapes(specs: Sequence, *, batch: int | None = None, shapes: Mapping[str, Shape] | None = None,
                    sample_shapes: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """One concrete shape per input (see the module docstring); ConfigError when one cannot be fixed.

    ``sample_shapes`` are per-sample shapes (without the batch axis) seen in the
    evaluation data.
    """
    shapes = dict(shapes or {})
    sample_shapes = sample_shapes or {}
    names = {s.name for s in specs}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise ConfigError(f"--shape names {', '.join(unknown)}, which the model does not take; its inputs: "
                          f"{', '.join(sorted(names))}")
    result: dict[str, Shape] = {}
    for spec in specs:
        if spec.name in shapes:
            result[spec.name] = _check_declared(spec, shapes[spec.name])
            continue
        dims = list(spec.shape)
        concrete = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                if axis == 0 and batch is not None and batch != dim and len(dims) > 1:
                    raise ConfigError(f"input {spec.name!r} has a fixed batch of {dim}; --batch {batch} cannot "
                                      f"apply (export the model with a dynamic batch axis)")
                concrete.append(dim)
            elif axis == 0:
                concrete.append(batch or 1)
            elif spec.name in sample_shapes and len(sample_shapes[spec.name]) == len(dims) - 1:
                concrete.append(int(sample_shapes[spec.name][axis - 1]))
            else:
                raise ConfigError(
                    f"input {spec.name!r} has symbolic dim {axis} ({_dim_label(dim)}) that sets the size of what is "
                    f"timed: pass --shape {spec.name}={'x'.join(_hint(dims, batch))} or evaluation data with --eval")
        result[spec.name] = tuple(concrete)
    return result


def _hint(dims, batch) -> list[str]:
    return [str(d) if isinstance(d, int) and d > 0 else (str(batch or 1) if i == 0 else "N")
            for i, d in enumerate(dims)]


def _check_declared(spec, shape: Shape) -> Shape:
    if len(shape) != len(spec.shape):
        raise ConfigError(f"--shape {spec.name}={'x'.join(map(str, shape))} has {len(shape)} dims; input "
                          f"{spec.describe()} has {len(spec.shape)}")
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if isinstance(want, int) and want > 0 and want != got:
            raise ConfigError(f"--shape {spec.name}={'x'.join(map(str, shape))}: dim {axis} of {spec.describe()} "
                              f"is fixed at {want}")
    return tuple(shape)


def describe(shapes: Mapping[str, Shape]) -> str:
    """``x=1x3x224x224, mask=1x64``: how shapes are written in reports and on the terminal."""
    return ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in shapes.items())


def feed_at(shapes: Mapping[str, Shape], sample: Mapping[str, np.ndarray] | None, make_random) -> dict[str, np.ndarray]:
    """The feed timed: evaluation samples repeated or cut to the declared batch, or random data.

    ``sample`` is one evaluation feed (any batch); ``make_random(shapes)`` makes a random feed.
    """
    if sample is None:
        return make_random(shapes)
    feed = {}
    for name, shape in shapes.items():
        data = np.asarray(sample[name])
        if data.shape[1:] != tuple(shape[1:]):
            return make_random(shapes)  # --shape asked for another per-sample shape than the data has
        reps = -(-shape[0] // max(len(data), 1))
        feed[name] = np.ascontiguousarray(np.concatenate([data] * reps)[: shape[0]])
    return feed
