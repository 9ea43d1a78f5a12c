"""ONNX backend API over dlopt's ort backend: ONNX Runtime."""

from dlopt.onnx_backend._api import DloptBackend, DloptRep


class OrtOnnxBackend(DloptBackend):
    target = "ort"


prepare = OrtOnnxBackend.prepare
run_model = run = OrtOnnxBackend.run_model
run_node = OrtOnnxBackend.run_node
supports_device = OrtOnnxBackend.supports_device
is_compatible = OrtOnnxBackend.is_compatible

__all__ = ["OrtOnnxBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
