"""ONNX backend API over dlopt's ort backend: ONNX Runtime."""

from dlopt.backend._api import DloptBackend, DloptRep


class OrtBackend(DloptBackend):
    target = "ort"


prepare = OrtBackend.prepare
run_model = run = OrtBackend.run_model
run_node = OrtBackend.run_node
supports_device = OrtBackend.supports_device
is_compatible = OrtBackend.is_compatible

__all__ = ["OrtBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
