"""ONNX backend API over dlopt's openvino backend: OpenVINO (CPU plugin, f32)."""

from dlopt.onnx_backend._api import API, DloptRep, module_api

OpenVinoOnnxBackend, prepare, run_model, run, run_node, supports_device, is_compatible = module_api(
    "openvino", "OpenVinoOnnxBackend")
__all__ = ["OpenVinoOnnxBackend", "DloptRep", *API]
