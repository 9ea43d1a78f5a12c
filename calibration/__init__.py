"""Data that flows into a compile: evaluation feeds, labels and (later) calibration sets."""

from dlopt.calibration.npz import NpzDataset

__all__ = ["NpzDataset"]
