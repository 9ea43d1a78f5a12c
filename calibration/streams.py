"""Feeds from Python iterables, generators and torch DataLoaders.

torch is never imported here: a tensor is recognised by its ``detach``/``numpy``
methods, and a DataLoader only exists if its caller has imported torch already.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Sequence

import numpy as np

from dlopt.calibration.dataset import LABELS, CalibrationDataset, expected
from dlopt.core.errors import DataError


def is_tensor(value) -> bool:
    return callable(getattr(value, "detach", None)) and callable(getattr(value, "numpy", None))


def is_dataloader(source) -> bool:
    torch = sys.modules.get("torch")  # no torch imported, no DataLoader possible
    return torch is not None and isinstance(source, torch.utils.data.DataLoader)


def _numpy(value):
    return value.detach().cpu().numpy() if is_tensor(value) else value


class StreamDataset(CalibrationDataset):
    """Feeds from an iterable whose items are batches, each one of:

    - a dict keyed by input names (values numpy arrays or torch tensors), with an
      optional ``labels`` entry when no input has that name;
    - a tuple or list: the inputs in the model's input order, then optionally labels;
    - a single array or tensor, for a single-input model.

    The first axis of every value counts samples.  ``batch_size=None`` keeps the
    source's own batches (a fixed batch dimension in the model still re-batches).
    A one-pass iterator (a generator) can be iterated once; the second pass raises
    :class:`DataError` instead of silently yielding nothing.
    """

    def __init__(self, source: Iterable, specs: Sequence, *, batch_size: int | None = None,
                 limit: int | None = None, constants: dict | None = None) -> None:
        kind = "DataLoader" if is_dataloader(source) else type(source).__name__
        super().__init__(specs, where=f"calibration data ({kind})", batch_size=batch_size, limit=limit,
                         constants=constants)
        self._source = source
        self._one_pass = isinstance(source, Iterator)
        self._started = False

    def _chunks(self) -> Iterator[tuple[dict, np.ndarray | None]]:
        if self._one_pass:
            if self._started:
                raise DataError(f"{self.where} is a one-pass iterator and was read already; "
                                "pass a list, a DataLoader or another re-iterable source")
            self._started = True
        for index, item in enumerate(self._source):
            yield self._unpack(item, index)

    def _unpack(self, item, index: int) -> tuple[dict, np.ndarray | None]:
        names = [s.name for s in self.specs]
        labels = None
        if isinstance(item, Mapping):
            feed = {key: _numpy(value) for key, value in item.items()}
            if LABELS in feed and LABELS not in names:
                labels = np.asarray(feed.pop(LABELS))
        elif isinstance(item, (tuple, list)):
            if len(item) not in (len(names), len(names) + 1):
                raise DataError(f"{self.where}: batch {index} is a {type(item).__name__} of {len(item)} items; "
                                f"expected {len(names)} (the inputs in model order) or {len(names) + 1} (then labels)"
                                f"{expected(self.specs)}")
            feed = {name: _numpy(value) for name, value in zip(names, item)}
            if len(item) > len(names):
                labels = np.asarray(_numpy(item[-1]))
        elif isinstance(item, np.ndarray) or is_tensor(item):
            if len(names) != 1:
                raise DataError(f"{self.where}: batch {index} is a single array but the model has {len(names)} inputs; "
                                f"give a dict keyed by input name{expected(self.specs)}")
            feed = {names[0]: _numpy(item)}
        else:
            raise DataError(f"{self.where}: batch {index} is a {type(item).__name__}; expected a dict of arrays, "
                            f"a tuple of arrays or an array{expected(self.specs)}")
        return feed, labels
