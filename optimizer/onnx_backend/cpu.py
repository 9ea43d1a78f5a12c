"""ONNX backend API over the ``cpu`` profile: per model, the first of its backends (ONNX Runtime,
OpenVINO, TVM) whose outputs match the ONNX reference implementation's where that runs the model
(small models), else the first that runs it, checked against ONNX Runtime
(``dlopt.onnx_backend.engines.FallbackEngine``)."""

from dlopt.onnx_backend._api import API, DloptRep, module_api

CpuOnnxBackend, prepare, run_model, run, run_node, supports_device, is_compatible = module_api(
    "cpu", "CpuOnnxBackend")
__all__ = ["CpuOnnxBackend", "DloptRep", *API]
