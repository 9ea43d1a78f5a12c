"""Data that flows into a compile: calibration sets, evaluation feeds and their labels.

Everything here streams: a :class:`CalibrationDataset` reads its source batch by
batch and checks each batch against the model's inputs as it goes.
"""

from dlopt.calibration.dataset import CalibrationDataset
from dlopt.calibration.factory import open_dataset
from dlopt.calibration.images import ImageFolderDataset, ImagePreprocess
from dlopt.calibration.memory import PeakRSS
from dlopt.calibration.npz import NpzDataset
from dlopt.calibration.streams import StreamDataset

__all__ = ["CalibrationDataset", "ImageFolderDataset", "ImagePreprocess", "NpzDataset", "PeakRSS",
           "StreamDataset", "open_dataset"]
