"""One entry point from whatever the user has to a :class:`CalibrationDataset`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Sequence

import numpy as np

from dlopt.calibration.dataset import CalibrationDataset
from dlopt.calibration.images import ImageFolderDataset, ImagePreprocess
from dlopt.calibration.npz import NpzDataset
from dlopt.calibration.streams import StreamDataset, is_tensor
from dlopt.core.errors import ConfigError, DataError


def open_dataset(source, specs: Sequence, *, limit: int | None = None, batch_size: int | None = None,
                 preprocess: ImagePreprocess | None = None, constants: dict | None = None) -> CalibrationDataset:
    """Choose the reader by what ``source`` is; nothing heavy is read here beyond file headers.

    - a folder path: its images, with ``preprocess`` (required there, refused elsewhere);
    - any other path: an ``.npz`` file (a ``.npy``, a pickle or a non-zip is a DataError);
    - a dict of arrays, a single array or tensor: one chunk of samples;
    - any other iterable (list, generator, torch DataLoader): items are batches, see
      :class:`StreamDataset`.

    ``batch_size=None`` means 1 for files and folders and the source's own batches for
    iterables; a model with a fixed first dimension always gets batches of that size.
    ``limit`` caps the number of samples read (e.g. ``--calib-samples``); ``constants``
    are inputs the source need not hold, the same array in every feed (``--const``).
    """
    if isinstance(source, CalibrationDataset):
        if (limit, batch_size, preprocess) != (None, None, None):
            raise ConfigError("limit, batch_size and preprocess apply when opening a source, "
                              "not to an already opened CalibrationDataset")
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if preprocess is None:
                raise ConfigError(f"{path} is a folder of images: pass preprocess=ImagePreprocess(size=(h, w), ...) "
                                  "to say how they become model inputs")
            return ImageFolderDataset(path, specs, preprocess=preprocess, batch_size=batch_size, limit=limit,
                                      constants=constants)
        if preprocess is not None:
            raise ConfigError(f"preprocess applies to image folders; {path} is not a folder")
        return NpzDataset(path, specs, batch_size=batch_size, limit=limit, constants=constants)
    if preprocess is not None:
        raise ConfigError("preprocess applies to image folders only")
    if isinstance(source, (Mapping, np.ndarray)) or is_tensor(source):
        source = [source]  # one chunk; the first axis still counts samples
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise DataError(f"cannot read calibration data from a {type(source).__name__}; pass an .npz path, an image "
                        "folder, an iterable of feed dicts or a torch DataLoader (wrap a torch Dataset in one)")
    return StreamDataset(source, specs, batch_size=batch_size, limit=limit, constants=constants)
