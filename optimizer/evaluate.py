"""Input specs and the comparison of a candidate's outputs with the original's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import onnx

from dlopt.errors import ModelError
from dlopt.fidelity import Fidelity, compare

__all__ = ["FP32_TOLERANCE", "Fidelity", "InputSpec", "compare", "input_specs", "output_specs", "top1_accuracy"]

# Largest relative error (max |candidate - reference| / max |reference|) an fp32 candidate may
# show: more means a pass or backend changed the maths.  Lower precisions answer to the budget.
# Float reassociation alone reaches 1e-4 on deep nets: the pretrained PP-OCRv4 recogniser (38
# Convs, attention, softmax over 6625 classes) differs by 2.2e-4 after onnxsim's folding on ORT
# and 3.1e-4 on OpenVINO, while a changed op's maths shows as 1e-2 and more.
FP32_TOLERANCE = 1e-3


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
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
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
        specs.append(InputSpec(value.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims))
    return specs


def top1_accuracy(outputs: Iterable[np.ndarray], labels: Iterable[np.ndarray]) -> float:
    """Top-1 accuracy of the first output's argmax over the last axis against integer labels."""
    correct = total = 0
    for logits, label in zip(outputs, labels, strict=True):
        pred = np.asarray(logits).reshape(len(label), -1).argmax(-1)
        correct += int(np.sum(pred == np.asarray(label).reshape(-1)))
        total += len(label)
    return correct / total if total else float("nan")
