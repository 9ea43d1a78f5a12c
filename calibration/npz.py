"""Feed data from an ``.npz`` file: one array per model input, first axis = samples.

Used for ``--inputs`` (evaluation feeds) and, with a ``labels`` array, for
labelled accuracy.  Files are opened with ``allow_pickle=False``: user data is
never unpickled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dlopt.errors import DataError, first_line

LABELS = "labels"


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(f"{path} holds pickled data; dlopt never unpickles data files, save plain arrays with numpy.savez") from exc
        raise DataError(f"cannot read {path} as .npz: {first_line(exc)}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as .npz: {first_line(exc)}") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array; expected an .npz with one array per model input")
    return data


class NpzDataset:
    """Batches of feed dicts from an .npz, checked against the model's inputs up front.

    ``specs`` are the model's :class:`dlopt.evaluate.InputSpec`.  Each array's
    first axis counts samples; feeds hold ``batch_size`` samples (the model's fixed
    batch dimension when it has one).
    """

    def __init__(self, path: str | Path, specs: Sequence, *, batch_size: int = 32) -> None:
        self.path = Path(path)
        data = _open(self.path)
        try:
            self._arrays = {name: self._read(data, name) for name in data.files}
        finally:
            data.close()
        self.specs = list(specs)
        self.labels = self._arrays.pop(LABELS, None)
        self._check()
        self.samples = len(next(iter(self._arrays.values())))
        fixed = {s.shape[0] for s in self.specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
        # A model with a fixed batch dimension takes only whole batches: a remainder is dropped.
        self.fixed_batch = len(fixed) == 1
        self.batch_size = fixed.pop() if self.fixed_batch else batch_size
        if self.fixed_batch and self.samples < self.batch_size:
            raise DataError(f"{self.path}: {self.samples} samples, fewer than the model's fixed batch of {self.batch_size}")

    def _read(self, data, name: str) -> np.ndarray:
        try:
            return data[name]
        except ValueError as exc:
            raise DataError(f"{self.path}: array {name!r} holds Python objects (pickled); save numeric arrays") from exc
        except Exception as exc:
            raise DataError(f"{self.path}: cannot read array {name!r}: {first_line(exc)}") from exc

    def _expected(self) -> str:
        return "; the model expects " + ", ".join(s.describe() for s in self.specs)

    def _check(self) -> None:
        names = {s.name for s in self.specs}
        given = set(self._arrays)
        if given != names:
            missing, extra = sorted(names - given), sorted(given - names)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise DataError(f"{self.path}: {' and '.join(parts)}{self._expected()}")
        counts = {len(a) if a.ndim else 0 for a in self._arrays.values()}
        if counts == {0}:
            raise DataError(f"{self.path} holds no samples{self._expected()}")
        if len(counts) != 1:
            raise DataError(f"{self.path}: arrays disagree on the number of samples (first axis)")
        for spec in self.specs:
            array = self._arrays[spec.name]
            if array.dtype != spec.dtype:
                raise DataError(f"{self.path}: {spec.name!r} is {array.dtype.name}{self._expected()}")
            sample_dims = spec.shape[1:]
            if array.ndim != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and d != a for d, a in zip(sample_dims, array.shape[1:])
            ):
                raise DataError(f"{self.path}: {spec.name!r} has shape {list(array.shape)} (first axis = samples){self._expected()}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise DataError(f"{self.path}: {spec.name!r} contains NaN or Inf values")
        if self.labels is not None and len(self.labels) != len(next(iter(self._arrays.values()))):
            raise DataError(f"{self.path}: 'labels' has {len(self.labels)} entries, inputs have {len(next(iter(self._arrays.values())))} samples")

    def _starts(self) -> range:
        end = self.samples - self.samples % self.batch_size if self.fixed_batch else self.samples
        return range(0, end, self.batch_size)

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in self._starts():
            yield {name: a[start : start + self.batch_size] for name, a in self._arrays.items()}

    def label_batches(self) -> list[np.ndarray]:
        if self.labels is None:
            return []
        return [self.labels[s : s + self.batch_size] for s in self._starts()]
