"""Narrow float and integer types (bfloat16, float8, 4-bit) across the runtimes' Python APIs.

ONNX hands these over as ``ml_dtypes`` arrays, one element per byte for 4-bit types;
OpenVINO's ``infer`` reads numpy arrays by their numpy type and returns such outputs as
raw containers (bfloat16 as float16 bits, float8 as uint8, 4-bit types packed two to a
byte).  Inputs therefore go in as ``openvino.Tensor`` objects holding the raw bits, and
outputs are reinterpreted (or unpacked) as the type and shape the model declares.
(ONNX Runtime takes them as ``OrtValue``s of their ONNX type: ``engines.OrtEngine``.)
"""

from __future__ import annotations

import math

import numpy as np

_PACKED = {"int4", "uint4", "float4_e2m1fn"}
_NARROW = {"bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
           *_PACKED}


def narrow(dtype: np.dtype) -> bool:
    """An ml_dtypes type numpy's own API cannot hand to a runtime."""
    return np.dtype(dtype).name in _NARROW


def packed(dtype: np.dtype) -> bool:
    """A 4-bit type, one element per byte in numpy, two per byte in the runtimes."""
    return np.dtype(dtype).name in _PACKED


def to_tensor(array: np.ndarray, element_type):
    """``array`` (an ml_dtypes array) as an OpenVINO tensor of ``element_type`` with the same bits."""
    import openvino as ov

    tensor = ov.Tensor(element_type, ov.Shape(list(array.shape)))
    target = tensor.data.reshape(-1)
    if array.dtype.name in _PACKED:
        nibbles = array.reshape(-1).view(np.uint8) & 0xF
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        bits = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
    else:
        bits = array.reshape(-1).view(f"u{array.dtype.itemsize}")
    np.copyto(target, bits.view(target.dtype))
    return tensor


def from_output(raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """An OpenVINO output container read back as ``dtype`` (a narrow type) of ``shape``."""
    dtype = np.dtype(dtype)
    if dtype.name in _PACKED:
        if shape is None:
            raise ValueError(f"cannot unpack a {dtype.name} output of unknown shape")
        count = math.prod(shape)
        packed = raw.reshape(-1).view(np.uint8)
        nibbles = np.empty(packed.size * 2, np.uint8)
        nibbles[0::2], nibbles[1::2] = packed & 0xF, packed >> 4
        nibbles = nibbles[:count]
        if dtype.name == "int4":  # sign-extend before the value conversion
            signed = np.where(nibbles > 7, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8)
            return signed.astype(dtype).reshape(shape)
        return nibbles.view(dtype).reshape(shape) if dtype.itemsize == 1 else nibbles.astype(dtype).reshape(shape)
    if raw.dtype.itemsize != dtype.itemsize:
        return raw.astype(dtype)
    return raw.view(dtype)
