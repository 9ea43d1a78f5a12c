"""ONNX backend API over dlopt's tvm backend: Apache TVM (Relax, llvm), built at the first run
for the inputs' shapes, with shape inputs bound and shapes folded."""

from dlopt.onnx_backend._api import API, DloptRep, module_api

TvmOnnxBackend, prepare, run_model, run, run_node, supports_device, is_compatible = module_api(
    "tvm", "TvmOnnxBackend")
__all__ = ["TvmOnnxBackend", "DloptRep", *API]
