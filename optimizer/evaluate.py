"""Input specs and the comparison of a candidate's outputs with the original's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx

from dlopt.errors import ModelError

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


@dataclass
class Fidelity:
    """How closely a candidate reproduces the reference outputs, worst case over all feeds."""

    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |reference|, per output
    min_cosine: float
    top1_agreement: float | None  # share of samples whose argmax matches (first output)
    non_finite: str | None = None  # "NaN in output 0 on feed 3" where the reference is finite there

    def to_dict(self) -> dict:
        return asdict(self)


def _non_finite(ref: np.ndarray, got: np.ndarray) -> str | None:
    """NaN or Inf in ``got`` where ``ref`` is finite: a broken candidate, whatever else it scores."""
    bad = ~np.isfinite(got) & np.isfinite(ref)
    if not bad.any():
        return None
    return "NaN" if np.isnan(got[bad]).any() else "Inf"


def compare(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> Fidelity:
    """Worst-case agreement of ``candidate`` with ``reference``; NaN never hides in a maximum."""
    max_abs = max_rel = 0.0
    min_cos = 1.0
    agree = total = 0
    for feed, (ref_outs, cand_outs) in enumerate(zip(reference, candidate, strict=True)):
        for index, (ref, got) in enumerate(zip(ref_outs, cand_outs, strict=True)):
            ref64 = np.asarray(ref, dtype=np.float64)
            got64 = np.asarray(got, dtype=np.float64)
            if ref64.shape != got64.shape:
                return Fidelity(float("inf"), float("inf"), -1.0, 0.0)
            kind = _non_finite(ref64, got64)
            if kind is not None:
                return Fidelity(float("inf"), float("inf"), -1.0, 0.0, f"{kind} in output {index} on feed {feed}")
            # where both are non-finite alike (the original itself gives Inf), compare the rest
            same = ~np.isfinite(ref64) & (np.isnan(ref64) & np.isnan(got64) | (ref64 == got64))
            if same.any():
                ref64, got64 = np.where(same, 0.0, ref64), np.where(same, 0.0, got64)
            diff = float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0
            scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else diff)
            a, b = ref64.ravel(), got64.ravel()
            norm = float(np.linalg.norm(a) * np.linalg.norm(b))
            cos = float(np.dot(a, b) / norm) if norm > 0 else float(np.array_equal(a, b))
            min_cos = min(min_cos, cos)
            if index == 0 and ref64.ndim >= 2 and np.issubdtype(np.asarray(ref).dtype, np.floating):
                agree += int(np.sum(ref64.argmax(-1) == got64.argmax(-1)))
                total += int(np.prod(ref64.shape[:-1]))
    return Fidelity(max_abs, max_rel, min_cos, agree / total if total else None)


def top1_accuracy(outputs: Iterable[np.ndarray], labels: Iterable[np.ndarray]) -> float:
    """Top-1 accuracy of the first output's argmax over the last axis against integer labels."""
    correct = total = 0
    for logits, label in zip(outputs, labels, strict=True):
        pred = np.asarray(logits).reshape(len(label), -1).argmax(-1)
        correct += int(np.sum(pred == np.asarray(label).reshape(-1)))
        total += len(label)
    return correct / total if total else float("nan")
