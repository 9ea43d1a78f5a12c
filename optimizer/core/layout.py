"""How data samples map onto a model's inputs: each input's batch axis, and what one sample is.

Real models do not all put the batch first.  A recurrent state is ``[layers, batch,
hidden]``, a sample rate is a scalar, and a fixed-size state has no batch axis at all.
The rule dlopt applies to every data source (``--eval``, ``--calib``, Python feeds):

- an array holds N samples along its first axis;
- a sample whose rank equals the input's rank is the whole tensor as fed (a state
  ``[2, 1, 128]``; a scalar ``sr`` given as N scalars);
- a sample one rank lower is one item along the input's batch axis, which need not
  be the first (an item ``[2, 128]`` of a state ``[2, batch, 128]``).

The batch axis of an input is the axis that carries the model's batch dim name (the
symbolic name most inputs use for their first axis, e.g. ``batch``); without such a
name it is the first axis that is not fixed (silero-vad's anonymous ``state [2, ?, 128]``:
axis 1), or the first axis when all are fixed.  A rank-0 input has none.

When every input's samples are items, feeds are batches of samples along each batch
axis.  When any input's samples are whole tensors, the model is fed one sample at a
time, as given: a stateful model's samples are evaluated in order, each on its own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from dlopt.core.errors import DataError

ITEM, WHOLE = "item", "whole"


def batch_dim_name(specs: Sequence) -> str | None:
    """The symbolic name most inputs give their first axis (``batch``), or None."""
    names = collections.Counter(s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str) and s.shape[0])
    return names.most_common(1)[0][0] if names else None


def batch_axes(specs: Sequence) -> dict[str, int | None]:
    """Each input's batch axis (see the module docstring); None for rank-0 inputs."""
    name = batch_dim_name(specs)
    axes: dict[str, int | None] = {}
    for spec in specs:
        if not spec.shape:
            axes[spec.name] = None
        elif name is not None and name in spec.shape:
            axes[spec.name] = list(spec.shape).index(name)
        else:  # no shared name (anonymous dims): the first dim that is not fixed, never a fixed one
            axes[spec.name] = next((i for i, d in enumerate(spec.shape) if not _fixed(d)), 0)
    return axes


def _fixed(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _rule(spec, axis: int | None) -> str:
    dims = [str(d) if d is not None else "?" for d in spec.shape]
    whole = ", ".join(["samples", *dims])
    if axis is None:
        return f"each sample is the whole tensor as fed: an array [{whole}]"
    item = ", ".join(["samples", *(d for i, d in enumerate(dims) if i != axis)])
    return f"each sample is the whole tensor as fed ([{whole}]) or one item along batch axis {axis} ([{item}])"


def sample_kind(spec, shape: tuple[int, ...], axis: int | None, where: str, expects: str = "", at: str = "") -> str:
    """ITEM or WHOLE for an array of ``shape`` (first axis = samples) fed to ``spec``; DataError otherwise."""
    if not shape:
        raise DataError(f"{where}: {spec.name!r} is a scalar; an array holds N samples along its first axis "
                        f"(a scalar input is given as N scalars, or once with --const {spec.name}=VALUE){expects}")
    if not spec.shape:  # rank 0, or a rank the model does not declare
        return WHOLE if len(shape) == 1 else ITEM
    rank = len(spec.shape)
    sample = tuple(shape[1:])
    if len(sample) == rank and all(not _fixed(d) or d == s for d, s in zip(spec.shape, sample)):
        return WHOLE
    if axis is not None and len(sample) == rank - 1:
        rest = [d for i, d in enumerate(spec.shape) if i != axis]
        if all(not _fixed(d) or d == s for d, s in zip(rest, sample)):
            return ITEM
    raise DataError(f"{where}: {spec.name!r} has shape {list(shape)}{' ' + at if at else ''} (first axis = samples); input "
                    f"{spec.describe()}: {_rule(spec, axis)}{expects}")


@dataclass(frozen=True)
class Layout:
    """How one source's arrays become feeds: per input, ITEM or WHOLE and its batch axis."""

    kinds: Mapping[str, str]
    axes: Mapping[str, int | None]

    @property
    def per_sample(self) -> bool:
        """Whether feeds hold one sample each (some input's samples are whole tensors)."""
        return any(kind == WHOLE for kind in self.kinds.values())

    @property
    def standard(self) -> bool:
        """Items along axis 0 for every input: the arrays are feeds as they are."""
        return all(k == ITEM and self.axes[n] == 0 for n, k in self.kinds.items())

    def feed(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's feed for a batch of samples (first axis = samples; one sample when per_sample)."""
        if self.standard:
            return dict(batch)
        feed = {}
        for name, array in batch.items():
            if self.kinds.get(name) == WHOLE:
                feed[name] = np.array(array[0])  # not ascontiguousarray: it makes a 0-d sample 1-d
            else:
                feed[name] = np.ascontiguousarray(np.moveaxis(array, 0, self.axes.get(name) or 0))
        return feed


def layout_of(specs: Sequence, shapes: Mapping[str, tuple[int, ...]], where: str, expects: str = "",
              at: str = "") -> Layout:
    """The layout of arrays of ``shapes`` (first axis = samples) for the inputs ``specs``."""
    axes = batch_axes(specs)
    kinds = {s.name: sample_kind(s, tuple(shapes[s.name]), axes[s.name], where, expects, at) for s in specs
             if s.name in shapes}
    return Layout(kinds, axes)


def samples_in(feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None) -> int:
    """How many samples a model feed holds: the size of the first input's batch axis that has one, else 1."""
    for name, array in feed.items():
        axis = (axes or {}).get(name, 0)
        array = np.asarray(array)
        if axis is not None and array.ndim > axis:
            return int(array.shape[axis])
    return 1
