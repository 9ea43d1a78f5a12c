"""UpgradeOpsetPass: bring a model below opset 13 up to 13, so quantisation can be per channel.

Per-channel ``QuantizeLinear``/``DequantizeLinear`` (their ``axis`` attribute) exist
from opset 13; many exported models (older torchvision, PaddleOCR) are opset 11-12,
and ONNX Runtime's quantiser writes the attribute anyway, giving an invalid model.

Guarantees:

* A model already at ``target`` or above is returned unchanged.
* Otherwise ``onnx.version_converter`` converts it, and the result is kept only if
  ONNX Runtime gives the same outputs (relative error under ``tolerance``) as the
  original on a random feed; else the model is returned unchanged and
  :attr:`converted` is False, with the reason in :attr:`note`, so the caller can
  fall back to per-tensor weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from dlopt.core.errors import first_line
from dlopt.core.inputs import RandomInputs
from dlopt.core.model_io import EXTERNAL_DATA_THRESHOLD, initializer_bytes
from dlopt.core.ort_sessions import cpu_session_options
from dlopt.core.specs import input_specs

PER_CHANNEL_OPSET = 13


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    def __init__(self, *, target: int = PER_CHANNEL_OPSET, tolerance: float = 1e-4) -> None:
        super().__init__()
        self.target = target
        self.tolerance = tolerance
        self.converted = False
        self.note = ""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", self.target))
        if opset >= self.target:
            self.converted = True
            return ir.passes.PassResult(model.clone(), False)

        if initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD:  # one protobuf cannot hold it
            self.note = f"opset {opset} kept: the model is too large to convert in memory"
            return ir.passes.PassResult(model.clone(), False)
        proto = ir.serde.serialize_model(model)
        try:
            upgraded = onnx.version_converter.convert_version(proto, self.target)
            onnx.checker.check_model(upgraded)
            error = _max_rel_error(proto, upgraded)
        except Exception as exc:  # the converter raises RuntimeError, ValidationError and others
            self.note = f"opset {opset} could not be converted to {self.target}: {first_line(exc)}"
            return ir.passes.PassResult(model.clone(), False)
        if not error <= self.tolerance:
            self.note = (f"opset {opset} converted to {self.target} changed the outputs (max relative error "
                         f"{error:.2e}); kept at opset {opset}")
            return ir.passes.PassResult(model.clone(), False)
        self.converted = True
        self.note = f"opset {opset} -> {self.target} (outputs checked on ONNX Runtime, max relative error {error:.1e})"
        return ir.passes.PassResult(ir.serde.deserialize_model(upgraded), True)


def _max_rel_error(before: onnx.ModelProto, after: onnx.ModelProto) -> float:
    """Largest relative output difference of the two models on one random feed (ONNX Runtime)."""
    import onnxruntime as ort

    specs = input_specs(before)
    shapes = {s.name: s.concrete_shape() for s in specs}
    feed = RandomInputs.for_model(before, specs).feed(shapes, np.random.default_rng(0))

    options = cpu_session_options(log_level=4)  # a QDQ input model: exact int8 kernels without VNNI too
    outputs = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)
               for m in (before, after)]
    worst = 0.0
    for a, b in zip(*outputs, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst
