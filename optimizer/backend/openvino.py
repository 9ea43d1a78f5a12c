"""ONNX backend API over dlopt's openvino backend: OpenVINO (CPU plugin, f32)."""

from dlopt.backend._api import DloptBackend, DloptRep


class OpenVinoBackend(DloptBackend):
    target = "openvino"


prepare = OpenVinoBackend.prepare
run_model = run = OpenVinoBackend.run_model
run_node = OpenVinoBackend.run_node
supports_device = OpenVinoBackend.supports_device
is_compatible = OpenVinoBackend.is_compatible

__all__ = ["OpenVinoBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
