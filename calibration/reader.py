"""ONNX Runtime's calibration reader protocol over a :class:`CalibrationDataset`.

Kept apart from ``dataset.py`` because it imports onnxruntime, which only
quantisation needs.
"""

from __future__ import annotations

import itertools

from onnxruntime.quantization.calibrate import CalibrationDataReader


class DatasetReader(CalibrationDataReader):
    """``get_next()`` returns the next checked feed dict, then None at the end.

    ``rewind()`` starts again from the first batch (re-reading the source, never
    caching it); ``set_range(start, end)`` restricts it to batches ``[start, end)``
    as ORT's strided calibration asks; ``len()`` is the number of batches when the
    dataset knows it.  A deep copy (ORT's SmoothQuant takes one) is a fresh reader
    over the same dataset.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self._range: tuple[int, int | None] = (0, None)
        self.rewind()

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        # Dropping the old generator closes whatever file it held open.
        self._batches = itertools.islice(iter(self.dataset), *self._range)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, end_index)
        self.rewind()

    def __len__(self) -> int:
        return len(self.dataset)

    def __deepcopy__(self, memo) -> "DatasetReader":
        copy = DatasetReader(self.dataset)
        copy.set_range(*self._range)
        return copy
