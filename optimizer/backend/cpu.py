"""ONNX backend API over the ``cpu`` profile: per model, the first of its backends (ONNX Runtime,
OpenVINO, TVM) whose outputs match the ONNX reference implementation's where that runs the model
(small models), else the first that runs it, checked against ONNX Runtime
(``dlopt.backend.engines.FallbackEngine``)."""

from dlopt.backend._api import DloptBackend, DloptRep


class CpuBackend(DloptBackend):
    target = "cpu"


prepare = CpuBackend.prepare
run_model = run = CpuBackend.run_model
run_node = CpuBackend.run_node
supports_device = CpuBackend.supports_device
is_compatible = CpuBackend.is_compatible

__all__ = ["CpuBackend", "DloptRep", "prepare", "run_model", "run", "run_node", "supports_device", "is_compatible"]
