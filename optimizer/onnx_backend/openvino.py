"""ONNX backend API over dlopt's openvino backend: OpenVINO (CPU plugin, f32)."""

from dlopt.onnx_backend._api import DloptBackend, DloptRep


class OpenVinoOnnxBackend(DloptBackend):
    target = "openvino"


prepare = OpenVinoOnnxBackend.prepare
run_model = run = OpenVinoOnnxBackend.run_model
run_node = OpenVinoOnnxBackend.run_node
supports_device = OpenVinoOnnxBackend.supports_device
is_compatible = OpenVinoOnnxBackend.is_compatible

__all__ = ["OpenVinoOnnxBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
