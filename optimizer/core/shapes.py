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

from dlopt.core.errors import ConfigError
from dlopt.core.layout import batch_axes

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


def declared_shapes(specs: Sequence, *, batch: int | None = None, shapes: Mapping[str, Shape] | None = None,
                    sample_shapes: Mapping[str, Shape] | None = None,
                    data_shapes: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """One concrete shape per input (see the module docstring); ConfigError when one cannot be fixed.

    ``shapes`` maps input names to whole shapes and symbolic dim names to one size
    (``{"seq": (64,)}`` from ``--shape seq=64``: every input using ``seq`` gets 64).
    ``data_shapes`` are the shapes of one feed of evaluation or calibration data, as
    fed; ``sample_shapes`` per-sample shapes without a leading batch axis.  Every dim
    none of these fixes is listed in one error, with the flag that fixes it.
    """
    shapes = dict(shapes or {})
    sample_shapes = sample_shapes or {}
    data_shapes = data_shapes or {}
    names = {s.name for s in specs}
    dim_names = {d for s in specs for d in s.shape if isinstance(d, str) and d}
    by_dim = {k: v for k, v in shapes.items() if k not in names and k in dim_names}
    unknown = sorted(set(shapes) - names - set(by_dim))
    if unknown:
        raise ConfigError(f"--shape names {', '.join(unknown)}, which the model does not take as an input or a dim "
                          f"name; its inputs: {', '.join(sorted(names))}"
                          + (f"; its dim names: {', '.join(sorted(dim_names))}" if dim_names else ""))
    for dim, size in by_dim.items():
        if len(size) != 1:
            raise ConfigError(f"--shape {dim}={'x'.join(map(str, size))}: {dim!r} is a dim name; give it one size "
                              f"(--shape {dim}=64)")
    axes = batch_axes(specs)
    result: dict[str, Shape] = {}
    missing: list[tuple[object, int, object]] = []
    for spec in specs:
        if spec.name in shapes:
            result[spec.name] = _check_declared(spec, shapes[spec.name])
            continue
        dims = list(spec.shape)
        data = data_shapes.get(spec.name)
        concrete = []
        for axis, dim in enumerate(dims):
            is_batch = axis == axes.get(spec.name)
            if isinstance(dim, int) and dim > 0:
                if is_batch and batch is not None and batch != dim and len(dims) > 1:
                    raise ConfigError(f"input {spec.name!r} has a fixed batch of {dim}; --batch {batch} cannot "
                                      f"apply (export the model with a dynamic batch axis)")
                concrete.append(dim)
            elif isinstance(dim, str) and dim in by_dim:
                concrete.append(by_dim[dim][0])
            elif is_batch:
                concrete.append(batch or 1)
            elif data is not None and len(data) == len(dims):
                concrete.append(int(data[axis]))
            elif spec.name in sample_shapes and len(sample_shapes[spec.name]) == len(dims) - 1:
                concrete.append(int(sample_shapes[spec.name][axis - 1]))
            else:
                missing.append((spec, axis, dim))
                concrete.append(0)
        result[spec.name] = tuple(concrete)
    if missing:
        raise ConfigError(_missing_message(missing, batch, axes))
    return result


def _missing_message(missing, batch, axes) -> str:
    """Every unfixed dim at once, each with the one flag that fixes it."""
    fixes: dict[str, list[str]] = {}
    for spec, axis, dim in missing:
        if isinstance(dim, str) and dim:
            fixes.setdefault(f"--shape {dim}=N", []).append(f"{spec.name} dim {axis}")
        else:
            hint = "x".join(str(d) if isinstance(d, int) and d > 0 else
                            (str(batch or 1) if i == axes.get(spec.name) else "N") for i, d in enumerate(spec.shape))
            fixes.setdefault(f"--shape {spec.name}={hint}", []).append(f"{spec.name} dim {axis}, unnamed")
    parts = [f"{flag} ({', '.join(uses)})" for flag, uses in fixes.items()]
    many = len(missing) > 1
    return (f"{len(missing)} symbolic dim{'s' if many else ''} that set{'' if many else 's'} the size of what is "
            f"timed {'are' if many else 'is'} not fixed: pass {'; '.join(parts)}, or evaluation data with --eval")


def parse_const(text: str) -> tuple[str, int | float]:
    """``sr=16000`` → ("sr", 16000); ``state=0.5`` → ("state", 0.5); a ConfigError for anything else."""
    name, sep, value = text.partition("=")
    try:
        number = int(value) if re.fullmatch(r"[+-]?\d+", value.strip()) else float(value)
    except ValueError:
        number = None
    if not sep or not name or number is None or number != number:
        raise ConfigError(f"--const takes NAME=NUMBER (e.g. sr=16000), got {text!r}")
    return name, number


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
    return ", ".join(f"{name}={'x'.join(map(str, shape)) or 'scalar'}" for name, shape in shapes.items())


def feed_at(shapes: Mapping[str, Shape], sample: Mapping[str, np.ndarray] | None, make_random,
            axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """The feed timed: evaluation samples repeated or cut to the declared batch, or random data.

    ``sample`` is one evaluation feed (any batch); ``make_random(shapes)`` makes a random feed;
    ``axes`` is each input's batch axis (dlopt.core.layout; axis 0 when not given).
    """
    if sample is None:
        return make_random(shapes)
    feed = {}
    for name, shape in shapes.items():
        data = np.asarray(sample[name])
        shape = tuple(shape)
        if data.shape == shape:
            feed[name] = data
            continue
        axis = (axes or {}).get(name, 0)
        if axis is None or data.ndim != len(shape) or data.shape[axis] == 0 or \
                data.shape[:axis] + data.shape[axis + 1:] != shape[:axis] + shape[axis + 1:]:
            return make_random(shapes)  # --shape asked for another per-sample shape than the data has
        reps = -(-shape[axis] // data.shape[axis])
        repeated = np.concatenate([data] * reps, axis=axis)
        feed[name] = np.ascontiguousarray(np.take(repeated, np.arange(shape[axis]), axis=axis))
    return feed
