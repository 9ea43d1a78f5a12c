"""ONNX backend API over dlopt's ort backend: ONNX Runtime."""

from dlopt.onnx_backend._api import API, DloptRep, module_api

OrtOnnxBackend, prepare, run_model, run, run_node, supports_device, is_compatible = module_api(
    "ort", "OrtOnnxBackend")
__all__ = ["OrtOnnxBackend", "DloptRep", *API]
