"""Calibration feeds from a folder of images, preprocessed exactly as declared.

Pillow is imported only when a folder is opened: nothing else in dlopt needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from dlopt.calibration.dataset import CalibrationDataset, expected, shape_mismatch
from dlopt.core.errors import ConfigError, DataError, first_line

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LAYOUTS = ("NCHW", "NHWC")
COLORS = {"RGB": 3, "BGR": 3, "GRAY": 1}


@dataclass(frozen=True, kw_only=True)
class ImagePreprocess:
    """How an image file becomes one sample: nothing is guessed.

    In order: decode, convert to ``color`` (``"RGB"``, ``"BGR"`` or ``"GRAY"``),
    resize to ``size = (height, width)`` with bilinear filtering (skipped when the
    image already has that size), multiply by ``scale``, then per channel
    ``(value - mean) / std``; ``mean`` and ``std`` list channels in the order of
    ``color`` (B, G, R for ``"BGR"``), or hold one value for every channel.  The
    sample is laid out as ``"NCHW"`` or ``"NHWC"`` and cast to the model's dtype.
    Bad values raise :class:`dlopt.core.errors.ConfigError`.
    """

    size: tuple[int, int]
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    color: str = "RGB"
    scale: float = 1 / 255

    def __post_init__(self) -> None:
        size = tuple(self.size) if isinstance(self.size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
            raise ConfigError(f"ImagePreprocess size must be (height, width) in positive pixels, got {self.size!r}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"ImagePreprocess layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.color not in COLORS:
            raise ConfigError(f"ImagePreprocess color must be one of {', '.join(COLORS)}, got {self.color!r}")
        if not _finite(self.scale) or self.scale <= 0:
            raise ConfigError(f"ImagePreprocess scale must be a positive number, got {self.scale!r}")
        channels = COLORS[self.color]
        for name in ("mean", "std"):
            values = getattr(self, name)
            values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
            if len(values) not in (1, channels) or not all(_finite(v) for v in values):
                raise ConfigError(f"ImagePreprocess {name} must hold 1 or {channels} numbers for {self.color}, "
                                  f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(v <= 0 for v in self.std):
            raise ConfigError(f"ImagePreprocess std must be positive, got {self.std!r}")
        object.__setattr__(self, "size", size)

    @property
    def channels(self) -> int:
        return COLORS[self.color]

    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def apply(self, image) -> np.ndarray:
        """One decoded PIL image -> a float32 array of :meth:`sample_shape` (no batch axis)."""
        image = image.convert("L" if self.color == "GRAY" else "RGB")
        h, w = self.size
        if image.size != (w, h):
            image = image.resize((w, h), _pillow().Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32).reshape(h, w, self.channels)
        if self.color == "BGR":
            pixels = pixels[..., ::-1]
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        pixels = (pixels * np.float32(self.scale) - mean) / std
        return np.ascontiguousarray(pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels)


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(value)


def _pillow():
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError("reading an image folder needs Pillow, which is not installed: pip install pillow") from exc
    return Image


class ImageFolderDataset(CalibrationDataset):
    """Every .png/.jpg/.jpeg/.bmp under ``folder`` (recursively, sorted by path), one sample each.

    For single-input models with a floating-point input; the preprocessing is checked
    against the input's rank and fixed dimensions before any image is read.  An image
    that cannot be decoded raises :class:`DataError` naming the file.
    """

    def __init__(self, folder: str | Path, specs: Sequence, *, preprocess: ImagePreprocess,
                 batch_size: int | None = 1, limit: int | None = None, constants: dict | None = None) -> None:
        self.folder = Path(folder)
        super().__init__(specs, where=str(self.folder), batch_size=batch_size or 1, limit=limit, constants=constants)
        if not isinstance(preprocess, ImagePreprocess):
            raise ConfigError(f"preprocess must be an ImagePreprocess, got {type(preprocess).__name__}")
        self.preprocess = preprocess
        if len(self.specs) != 1:
            raise DataError(f"{self.folder}: an image folder feeds single-input models only{expected(self.specs)}")
        spec = self.specs[0]
        if spec.dtype.kind != "f":
            raise DataError(f"{self.folder}: images become floating-point samples{expected(self.specs)}")
        shape = (1, *preprocess.sample_shape())
        if shape_mismatch(spec, shape):
            raise DataError(f"{self.folder}: preprocessing makes samples of shape {list(shape)} "
                            f"(size={preprocess.size}, layout={preprocess.layout}, color={preprocess.color})"
                            f"{expected(self.specs)}")
        self._image = _pillow()
        if not self.folder.is_dir():
            raise DataError(f"image folder not found: {self.folder}")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not self.files:
            raise DataError(f"{self.folder} holds no samples (no {', '.join(SUFFIXES)} files){expected(self.specs)}")
        self.has_labels = False
        self.samples = self._usable(len(self.files))

    def _chunks(self) -> Iterator[tuple[dict, None]]:
        name, dtype = self.specs[0].name, self.specs[0].dtype
        for path in self.files[: self.samples]:
            try:
                with self._image.open(path) as image:
                    sample = self.preprocess.apply(image)
            except (OSError, ValueError, SyntaxError, self._image.DecompressionBombError) as exc:
                raise DataError(f"cannot read image {path}: {first_line(exc)}") from exc
            yield {name: sample[np.newaxis].astype(dtype, copy=False)}, None
