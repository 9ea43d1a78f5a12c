"""What a model takes and gives: each input's and output's name, dtype and shape (symbolic dims kept)."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from dlopt.core.errors import ModelError

if TYPE_CHECKING:  # a caller with a ModelProto has imported onnx; a verb that refuses its arguments need not
    import onnx


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # str/None: symbolic or unknown dimension

    def concrete_shape(self, default_dim: int = 1) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) and d > 0 else default_dim for d in self.shape)

    def describe(self) -> str:
        dims = ",".join(str(d) if d is not None else "?" for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def _np_dtype(elem_type: int):
    from onnx.helper import tensor_dtype_to_np_dtype

    return tensor_dtype_to_np_dtype(elem_type)


def input_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    initializers = {t.name for t in proto.graph.initializer}
    specs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise ModelError(f"input {value.name!r} is not a tensor; dlopt handles tensor inputs only")
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        dtype = np.dtype(_np_dtype(tensor.elem_type))
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def output_specs(proto: onnx.ModelProto) -> list[InputSpec]:
    specs = []
    for value in proto.graph.output:
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor.shape.dim
        )
        specs.append(InputSpec(value.name, np.dtype(_np_dtype(tensor.elem_type)), dims))
    return specs
